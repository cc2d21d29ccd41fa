"""The exact-score Gaussian-mixture denoiser: score, sampling statistics, exact Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.diffusion import gmm as G
from diverify.diffusion import schedulers as sch
from diverify.errors import DiverifyError

NOISE = sch.noise_schedule(1000, clip_sample=False)


def mixture_2d():
    return G.gaussian_mixture([0.3, 0.7], [[-1.0, 0.5], [1.2, -0.3]], [0.3, 0.5], NOISE)


def numpy_log_density(w, mu, s, x, abar):
    """float64 reference log p_t, written independently of the module."""
    v = abar * s ** 2 + 1 - abar
    d = mu.shape[1]
    diff = x[None, :] - np.sqrt(abar) * mu
    logs = np.log(w) - 0.5 * np.sum(diff ** 2, axis=1) / v - 0.5 * d * np.log(2 * np.pi * v)
    top = logs.max()
    return top + np.log(np.sum(np.exp(logs - top)))


@pytest.mark.parametrize("d", [2, 64])
def test_score_is_the_gradient_of_the_log_density(d):
    rng = np.random.default_rng(d)
    w = np.array([0.2, 0.5, 0.3])
    mu = rng.normal(size=(3, d))
    s = np.array([0.2, 0.6, 1.0])
    mix = G.gaussian_mixture(w, mu, s, NOISE)
    x = rng.normal(size=(4, d)).astype(np.float32)
    abar = np.array([0.999, 0.7, 0.2, 0.01], np.float32)
    ours = np.asarray(G.score(mix, x, abar))
    autodiff = np.asarray(jax.grad(lambda z: jnp.sum(G.log_density(mix, z, abar)))(x))
    np.testing.assert_allclose(ours, autodiff, rtol=1e-4, atol=1e-4)
    h = 1e-5
    for b in range(4):
        fd = np.array([(numpy_log_density(w, mu, s, x[b] + h * e, abar[b].astype(np.float64))
                        - numpy_log_density(w, mu, s, x[b] - h * e, abar[b].astype(np.float64))) / (2 * h)
                       for e in np.eye(d)[: min(d, 8)]])
        np.testing.assert_allclose(ours[b, : len(fd)], fd, rtol=2e-3, atol=2e-3)


def test_eps_is_the_scaled_score_and_conditioning_selects_components():
    mix = mixture_2d()
    x = np.array([[0.1, 0.2], [1.0, -1.0]], np.float32)
    t = np.array([100, 700])
    abar = NOISE.alphas_cumprod[t]
    expected = -np.sqrt(1 - abar)[:, None] * np.asarray(G.score(mix, x, abar))
    np.testing.assert_allclose(np.asarray(G.gmm_eps(mix, x, t)), expected, rtol=1e-6)
    only_first = np.array([[1.0 - 1e-7, 1e-7]] * 2, np.float32)
    v = abar * 0.3 ** 2 + 1 - abar
    single = np.sqrt(1 - abar)[:, None] * (x - np.sqrt(abar)[:, None] * np.array([-1.0, 0.5])) / v[:, None]
    np.testing.assert_allclose(np.asarray(G.gmm_eps(mix, x, t, only_first)), single, rtol=1e-4, atol=1e-5)
    with pytest.raises(DiverifyError, match="component weights"):
        G.gmm_eps(mix, x, t, np.ones((2, 3), np.float32) / 3)


@pytest.mark.parametrize("d,n,steps", [(2, 4000, 100), (64, 1000, 200)])
def test_ddim_with_exact_score_reproduces_the_mixture_moments(d, n, steps):
    rng = np.random.default_rng(0)
    if d == 2:
        mix = mixture_2d()
    else:
        mix = G.gaussian_mixture([0.5, 0.5], rng.normal(size=(2, d)) * 0.6, [0.4, 0.7], NOISE)
    x_T = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    x_0 = np.asarray(sch.sample(G.gmm_eps, mix, x_T, None, sch.ddim_schedule(NOISE, steps)), np.float64)
    mean, cov = G.moments(mix)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x_0.mean(axis=0) - mean) < 5 * se + 0.02)
    emp = np.cov(x_0, rowvar=False)
    if d == 2:
        np.testing.assert_allclose(emp, cov, atol=0.08)
    else:
        assert abs(np.trace(emp) - np.trace(cov)) / np.trace(cov) < 0.05
        top = np.linalg.eigh(cov)[1][:, -1]
        assert abs(top @ emp @ top - top @ cov @ top) / (top @ cov @ top) < 0.15


def test_ddim_jacobian_of_a_single_gaussian_is_the_product_of_step_slopes():
    s, d = 0.5, 3
    mix = G.gaussian_mixture([1.0], [[0.3, -0.2, 0.1]], [s], NOISE)
    schedule = sch.ddim_schedule(NOISE, 100)
    slope = 1.0
    for i in range(schedule.num_steps):
        c = sch.step_coefficients(schedule, i)
        a = c.alpha_prod_t
        deps = np.sqrt(1 - a) / (a * s ** 2 + 1 - a)
        dx0 = (1 - np.sqrt(1 - a) * deps) / np.sqrt(a)
        slope *= c.pred_x0_coeff * dx0 + c.eps_coeff * deps
    jac = np.asarray(G.ddim_jacobian(mix, schedule, np.array([0.5, -1.0, 2.0])))
    np.testing.assert_allclose(jac, slope * np.eye(d), rtol=1e-4, atol=1e-6)
    # The probability-flow map of N(0, I) -> N(mu, s^2 I) is x -> s x + mu; DDIM's discretisation
    # shrinks it a little (about 3% at 100 steps, converging to s as the steps grow).
    assert abs(slope - s) < 0.05 * s


def test_ddim_jacobian_matches_finite_differences_and_peaks_between_modes():
    mix = G.gaussian_mixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.2, 0.2], NOISE)
    schedule = sch.ddim_schedule(NOISE, 25)
    run = G.ddim_map(mix, schedule)
    x_T = np.array([0.05, 0.3], np.float32)
    jac = np.asarray(G.ddim_jacobian(mix, schedule, x_T))
    h = 1e-2
    fd = np.stack([(np.asarray(run(x_T + h * e)) - np.asarray(run(x_T - h * e))) / (2 * h)
                   for e in np.eye(2, dtype=np.float32)], axis=1)
    np.testing.assert_allclose(jac, fd, rtol=0.05, atol=0.05)
    at_mode = np.linalg.norm(np.asarray(G.ddim_jacobian(mix, schedule, np.array([2.5, 0.3]))), 2)
    assert np.linalg.norm(jac, 2) > 5 * at_mode
    with pytest.raises(DiverifyError, match="deterministic"):
        G.ddim_map(mix, sch.ddim_schedule(NOISE, 25, eta=1.0))
