"""Matrix balls (inf, Frobenius, nuclear) and their images through a fixed layer input: exact concretisation."""

import jax.numpy as jnp
import numpy as np
import pytest

from diverify.errors import DiverifyError
from diverify.specs import dense_image, matrix_ball

NORMS = ("inf", "fro", "nuclear")


def minimiser(a, norm, r):
    """The point of the radius-r ball (around 0) minimising <a, D>, from the dual norm's maximiser."""
    if norm == "inf":
        return -r * np.sign(a)
    if norm == "fro":
        return -r * a / np.linalg.norm(a)
    u, _, vt = np.linalg.svd(a)
    return -r * np.outer(u[:, 0], vt[0])


def ball_points(seed, shape, norm, r, n):
    """Random interior points and extreme points (sign corners, sphere points, rank-one edits)."""
    rng = np.random.default_rng(seed)
    if norm == "inf":
        return r * np.concatenate([rng.uniform(-1, 1, (n,) + shape), np.sign(rng.standard_normal((n,) + shape))])
    g = rng.standard_normal((n,) + shape)
    if norm == "fro":
        unit = g / np.linalg.norm(g.reshape(n, -1), axis=1)[:, None, None]
        return r * np.concatenate([unit, unit * rng.uniform(size=(n, 1, 1))])
    u, v = rng.standard_normal((n, shape[0])), rng.standard_normal((n, shape[1]))
    rank_one = np.einsum("ni,nj->nij", u, v) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))[:, None, None]
    nuclear = np.linalg.svd(g, compute_uv=False).sum(-1)
    return r * np.concatenate([rank_one, g / nuclear[:, None, None]])


@pytest.mark.parametrize("norm", NORMS)
def test_concretisation_is_attained_and_never_beaten(norm):
    rng = np.random.default_rng(0)
    center = rng.standard_normal((6, 5)).astype(np.float32)
    ball = matrix_ball(center, 0.7, norm)
    a = rng.standard_normal((4, 6, 5)).astype(np.float32)
    low = np.asarray(ball.minimize_linear(jnp.asarray(a)))
    for s in range(4):
        best = float(np.sum(a[s] * (center + minimiser(a[s], norm, 0.7))))
        # exact up to the nuclear ball's padding of the spectral norm
        assert low[s] == pytest.approx(best, rel=1e-3, abs=1e-4) and low[s] <= best + 1e-5
    points = center + ball_points(1, (6, 5), norm, 0.7, 200)
    values = np.einsum("sij,nij->ns", a, np.asarray(points))
    assert np.all(values >= low - 1e-4)
    lo, hi = ball.interval()
    assert np.all(np.asarray(points) >= np.asarray(lo) - 1e-6) and np.all(np.asarray(points) <= np.asarray(hi) + 1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_dense_image_matches_the_ball_through_the_layer(norm):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    ball = matrix_ball(np.zeros((6, 5), np.float32), 0.4, norm)
    image = dense_image(x, ball)
    b = rng.standard_normal((7, 3, 5)).astype(np.float32)
    direct = np.asarray(ball.minimize_linear(jnp.einsum("slo,li->sio", b, x)))
    reduced = np.asarray(image.minimize_linear(jnp.asarray(b)))
    assert np.all(reduced <= direct + 1e-5)
    np.testing.assert_allclose(reduced, direct, rtol=2e-3, atol=1e-4)
    moves = np.einsum("li,nio->nlo", x, ball_points(2, (6, 5), norm, 0.4, 200))
    lo, hi = (np.asarray(t) for t in image.interval())
    assert np.all(moves >= lo - 1e-5) and np.all(moves <= hi + 1e-5)
    # the interval is attained: each entry's extreme is reached by some edit
    for l, o in [(0, 0), (2, 4)]:
        e = np.zeros((3, 5), np.float32)
        e[l, o] = -1.0
        reach = -float(ball.minimize_linear(jnp.einsum("slo,li->sio", jnp.asarray(e)[None], x))[0])
        assert hi[l, o] == pytest.approx(reach, rel=1e-3)


def test_bad_matrix_balls_are_clear_errors():
    with pytest.raises(DiverifyError, match="2-D"):
        matrix_ball(np.zeros(3), 1.0)
    with pytest.raises(DiverifyError, match="not supported"):
        matrix_ball(np.zeros((2, 2)), 1.0, "spectral")
    with pytest.raises(DiverifyError, match=">= 0"):
        matrix_ball(np.zeros((2, 2)), -1.0)
    with pytest.raises(DiverifyError, match="does not fit"):
        dense_image(np.zeros((3, 4)), matrix_ball(np.zeros((2, 2)), 1.0))
