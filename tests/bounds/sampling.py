"""Points inside input sets that stress a bound: interior, corners and attacks.

A bound is checked against every point: uniform interior samples, random
vertices (corners) of the set, and projected-gradient points that push each
of a few random output directions up and down. Outputs are compared with a
tolerance relative to the output scale (float32 rounding), never more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diverify.specs import Box, Substitution


def _project(s, x):
    if isinstance(s, Box):
        return jnp.clip(x, s.lower, s.upper)
    d = (x - s.center) * s.active_mask
    if s.p == np.inf:
        return s.center + jnp.clip(d, -s.eps, s.eps)
    if s.p == 2.0:
        n = jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True))
        return s.center + d * jnp.minimum(1.0, s.eps / jnp.maximum(n, 1e-30))
    # l1: scale down (a point of the ball, not the exact projection)
    n = jnp.sum(jnp.abs(d), axis=-1, keepdims=True)
    return s.center + d * jnp.minimum(1.0, s.eps / jnp.maximum(n, 1e-30))


def _hull_points(s, key, n, concentration):
    weights = jax.random.dirichlet(key, jnp.full(s.candidates.shape[1], concentration), (n, s.candidates.shape[0]))
    picks = jnp.einsum("npk,pkh->nph", weights, s.candidates)
    return jax.vmap(lambda v: s.base.at[..., s.positions, :].set(v))(picks)


def interior(s, key, n):
    if isinstance(s, Substitution):
        return _hull_points(s, key, n, 1.0)
    lo, hi = s.interval()
    u = jax.random.uniform(key, (n,) + lo.shape)
    return jax.vmap(lambda t: _project(s, lo + t * (hi - lo)))(u)


def corners(s, key, n):
    if isinstance(s, Substitution):
        return _hull_points(s, key, n, 0.01)  # nearly vertices
    lo, hi = s.interval()
    b = jax.random.bernoulli(key, 0.5, (n,) + lo.shape)
    pts = jnp.where(b, hi, lo)
    return jax.vmap(lambda x: _project(s, x))(pts)


def attack(fn, s, key, directions=8, steps=20):
    """Signed-gradient ascent on ``<w, fn(x)>`` for random +-w (unit and Gaussian)."""
    y0 = fn(s.center)
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (directions,), 0, y0.size)
    unit = jax.vmap(lambda i: jax.nn.one_hot(i, y0.size).reshape(y0.shape))(idx)
    ws = jnp.concatenate([unit, jax.random.normal(k2, (directions,) + y0.shape)])
    ws = jnp.concatenate([ws, -ws])
    lo, hi = s.interval()
    step = jnp.max(hi - lo) / 8 + 1e-12

    def ascend(w):
        grad = jax.grad(lambda x: jnp.sum(w * fn(x)))
        body = lambda _, x: _project(s, x + step * jnp.sign(grad(x)))  # noqa: E731
        return jax.lax.fori_loop(0, steps, body, s.center)

    return jax.jit(jax.vmap(ascend))(ws)


def sample_points(fn, s, key, n=256, attack_directions=6):
    k1, k2, k3 = jax.random.split(key, 3)
    parts = [interior(s, k1, n), corners(s, k2, n), s.center[None]]
    if attack_directions:
        parts.append(attack(fn, s, k3, attack_directions))
    return jnp.concatenate(parts)


def assert_within(outputs, lower, upper, rtol=1e-5):
    """Every output lies in [lower, upper] up to ``rtol`` times the output scale."""
    outputs, lower, upper = (np.asarray(a, np.float64) for a in (outputs, lower, upper))
    assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)), "non-finite bound"
    scale = max(1.0, float(np.max(np.abs(outputs))))
    tol = rtol * scale
    below = float(np.max(lower - outputs))
    above = float(np.max(outputs - upper))
    assert below <= tol and above <= tol, f"bound violated: lower exceeds output by {below:.3g}, output exceeds upper by {above:.3g} (tolerance {tol:.3g})"


def check_sound(fn, s, bound, key, n=256, attack_directions=6, rtol=1e-5):
    pts = sample_points(fn, s, key, n, attack_directions)
    ys = jax.vmap(fn)(pts)
    assert_within(ys, bound.lower[None], bound.upper[None], rtol)
    return ys
