"""CWS training converges to the minimiser of the smoothed loss, known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diverify.cws.sampling import weight_perturbation
from diverify.cws.training import make_smoothed_train_step, smoothed_loss

SIGMA = 0.2


def double_well(params, batch):
    # L(t) = t^4 - t^2; under t + eps, eps ~ N(0, s^2): E L = t^4 + (6 s^2 - 1) t^2 + 3 s^4 - s^2,
    # minimised at t^2 = (1 - 6 s^2) / 2 instead of 1/2.
    t = params["t"][0]
    return t**4 - t**2


def test_smoothed_loss_estimate_matches_the_closed_form():
    params = {"t": jnp.array([0.9])}
    pert = weight_perturbation(params)
    estimate = float(smoothed_loss(double_well, params, None, pert, SIGMA, jax.random.key(0), 20000))
    t, s2 = 0.9, SIGMA**2
    exact = t**4 + (6 * s2 - 1) * t**2 + 3 * s2**2 - s2
    assert estimate == pytest.approx(exact, abs=0.01)


def test_training_finds_the_smoothed_minimiser_not_the_sharp_one():
    params = {"t": jnp.array([1.2])}
    pert = weight_perturbation(params)
    optimizer = optax.adam(0.01)
    step = make_smoothed_train_step(double_well, optimizer, pert, SIGMA, num_noise=64)
    state = optimizer.init(params)
    key = jax.random.key(1)
    trace = []
    for i in range(1200):
        params, state, _ = step(params, state, None, jax.random.fold_in(key, i))
        trace.append(float(params["t"][0]))
    final = np.mean(trace[-200:])
    assert final == pytest.approx(np.sqrt((1 - 6 * SIGMA**2) / 2), abs=0.03)
    assert abs(final - np.sqrt(0.5)) > 0.06
