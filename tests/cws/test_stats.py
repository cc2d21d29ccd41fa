"""Clopper-Pearson exactness and the certified radius against closed forms and brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diverify.cws.sampling import count_predicate_hits, weight_perturbation
from diverify.cws.stats import (
    certified_edit_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
    select_then_certify,
    smoothed_probability_bound,
)
from diverify.errors import DiverifyError


@pytest.mark.parametrize("n", [1, 7, 100])
def test_clopper_pearson_solves_the_defining_tail_equations(n):
    alpha = 0.05
    for k in range(n):
        # P[Bin(n, p_upper) <= k] = alpha, in float64 by the binomial cdf itself.
        assert stats.binom.cdf(k, n, clopper_pearson_upper(k, n, alpha)) == pytest.approx(alpha, rel=1e-8)
    for k in range(1, n + 1):
        assert stats.binom.sf(k - 1, n, clopper_pearson_lower(k, n, alpha)) == pytest.approx(alpha, rel=1e-8)


def test_clopper_pearson_edge_cases_are_exact():
    assert clopper_pearson_upper(10, 10, 0.01) == 1.0
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0
    # k = 0: (1 - p)^n = alpha; tiny alpha / large n must not lose precision to 1 - x.
    assert clopper_pearson_upper(0, 10**6, 1e-9) == pytest.approx(1 - 1e-9 ** 1e-6, rel=1e-9)
    assert clopper_pearson_upper(0, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-12)
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.05 ** (1 / 20), rel=1e-12)
    with pytest.raises(DiverifyError):
        clopper_pearson_upper(3, 2, 0.05)
    with pytest.raises(DiverifyError):
        clopper_pearson_upper(0, 2, 1.0)


def test_exact_coverage_of_the_upper_bound_never_drops_below_one_minus_alpha():
    # Coverage P_{k~Bin(n,p)}[p <= p_upper(k)] computed exactly over a fine grid of p.
    n, alpha = 30, 0.1
    uppers = np.array([clopper_pearson_upper(k, n, alpha) for k in range(n + 1)])
    ps = np.linspace(1e-4, 1 - 1e-4, 2001)
    coverage = np.array([stats.binom.pmf(np.arange(n + 1), n, p)[uppers >= p].sum() for p in ps])
    assert coverage.min() >= 1 - alpha - 1e-9
    # ... and it is exact: just above a bound p_upper(k) coverage falls back to 1 - alpha.
    just_above = uppers[5] + 1e-9
    cov = stats.binom.pmf(np.arange(n + 1), n, just_above)[uppers >= just_above].sum()
    assert cov == pytest.approx(1 - alpha, abs=1e-6)


def linear_toy(d=6, sigma=0.5, p_true=0.2):
    """pred(theta) = w . theta >= b with p(theta) = Phi((w . theta - b) / (sigma ||w||)) = p_true."""
    w = np.linspace(-1.0, 2.0, d)
    theta = np.cos(np.arange(d, dtype=np.float64))
    b = float(w @ theta - stats.norm.ppf(p_true) * sigma * np.linalg.norm(w))
    return w, theta, b


def test_monte_carlo_clopper_pearson_covers_the_true_probability_in_repeated_seeded_runs():
    sigma, p_true, alpha, n, runs = 0.5, 0.2, 0.05, 60, 200
    w, theta, b = linear_toy(sigma=sigma, p_true=p_true)
    params = {"theta": jnp.asarray(theta, jnp.float32)}
    wj = jnp.asarray(w, jnp.float32)

    def pred(p):
        return p["theta"] @ wj >= b

    pert = weight_perturbation(params)
    counts = [count_predicate_hits(pred, params, pert, sigma=sigma, key=jax.random.key(1000 + s),
                                   num_samples=n, batch_size=n) for s in range(runs)]
    covered = sum(p_true <= clopper_pearson_upper(k, n, alpha) for k in counts)
    # Coverage ~ Bin(runs, c) with c >= 1 - alpha; fail only if the count is below
    # what a nominal 1 - alpha coverage produces with probability 1e-3.
    threshold = stats.binom.ppf(1e-3, runs, 1 - alpha)
    assert covered >= threshold, (covered, threshold)
    # The counts themselves follow Bin(n, p_true): the mean is within 4 standard errors.
    se = math.sqrt(p_true * (1 - p_true) / (n * runs))
    assert abs(np.mean(counts) / n - p_true) < 4 * se


def test_radius_is_sound_and_attained_on_the_linear_toy():
    sigma, p_max = 0.5, 0.6
    w, theta, b = linear_toy(sigma=sigma, p_true=0.05)

    def smoothed(t):  # exact p(theta) of the linear predicate under N(0, sigma^2 I)
        return stats.norm.cdf((t @ w - b) / (sigma * np.linalg.norm(w)))

    p = smoothed(theta)
    radius = certified_edit_radius(p, sigma, p_max)
    assert radius > 0
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(5000, len(w)))
    deltas *= (radius * rng.uniform(0, 1, size=(5000, 1)) ** 0.2) / np.linalg.norm(deltas, axis=1, keepdims=True)
    moved = smoothed(theta + deltas)
    bounds = stats.norm.cdf(stats.norm.ppf(p) + np.linalg.norm(deltas, axis=1) / sigma)
    assert np.all(moved <= bounds + 1e-12)
    assert moved.max() <= p_max + 1e-12
    assert smoothed_probability_bound(p, radius, sigma) == pytest.approx(p_max, abs=1e-12)
    worst = radius * w / np.linalg.norm(w)
    assert smoothed(theta + worst) == pytest.approx(p_max, abs=1e-9)
    # Beyond R along the worst direction the smoothed probability exceeds p_max.
    assert smoothed(theta + 1.01 * worst) > p_max


def test_radius_holds_under_brute_force_search_for_a_nonlinear_predicate():
    # pred(x) = ||x - c|| <= r in 2-D: p(x) = P[chi'^2_2(||x - c||^2 / sigma^2) <= r^2 / sigma^2].
    sigma, r, c, p_max = 1.0, 1.0, np.array([3.0, 0.0]), 0.3

    def smoothed(x):
        return stats.ncx2.cdf(r * r / sigma**2, 2, np.sum((x - c) ** 2, axis=-1) / sigma**2)

    p = float(smoothed(np.zeros(2)))
    radius = certified_edit_radius(p, sigma, p_max)
    rho, phi = np.meshgrid(np.linspace(0, radius, 200), np.linspace(0, 2 * np.pi, 400))
    grid = np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=-1)
    worst = smoothed(grid).max()
    assert worst <= p_max
    # Not vacuous: the search reaches a good part of p_max (the bound is loose but not absurd).
    assert worst > p + 0.5 * (p_max - p)
    bound = stats.norm.cdf(stats.norm.ppf(p) + rho / sigma)
    assert np.all(smoothed(grid) <= bound + 1e-12)


def test_radius_edge_cases():
    assert certified_edit_radius(0.5, 1.0, 0.5) == 0.0
    assert certified_edit_radius(0.9, 1.0, 0.5) == 0.0
    assert math.isinf(certified_edit_radius(0.1, 1.0, 1.0))
    assert certified_edit_radius(stats.norm.cdf(-2.0), 0.25, stats.norm.cdf(1.0)) == pytest.approx(0.75)
    with pytest.raises(DiverifyError):
        certified_edit_radius(0.1, 0.0, 0.5)


def test_select_then_certify_uses_the_estimation_samples_only():
    d = select_then_certify(k_selection=95, n_selection=100, k_estimation=990, n_estimation=1000,
                            alpha=0.001, sigma=0.5)
    assert d.outcome and not d.abstain
    assert d.p_outcome_lower == clopper_pearson_lower(990, 1000, 0.001)
    assert d.radius == pytest.approx(0.5 * stats.norm.ppf(d.p_outcome_lower))
    false_side = select_then_certify(2, 100, 5, 1000, alpha=0.001, sigma=0.5)
    assert not false_side.outcome
    assert false_side.p_outcome_lower == clopper_pearson_lower(995, 1000, 0.001)
    # Selection says "true" but the estimation samples disagree: abstain, radius 0.
    abstain = select_then_certify(60, 100, 400, 1000, alpha=0.001, sigma=0.5)
    assert abstain.abstain and abstain.radius == 0.0
