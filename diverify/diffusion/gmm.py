"""An exact-score denoiser: an isotropic Gaussian mixture under the VP forward process.

Data: p_0 = sum_k w_k N(mu_k, s_k^2 I) in R^d. The forward process
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z keeps it a mixture,

    p_t = sum_k w_k N(sqrt(abar_t) mu_k, v_k I),   v_k = abar_t s_k^2 + 1 - abar_t,

whose score is grad log p_t(x) = -sum_k r_k(x) (x - sqrt(abar_t) mu_k) / v_k with
responsibilities r = softmax_k(log w_k + log N(x; sqrt(abar_t) mu_k, v_k I)).
The ideal eps-prediction (Tweedie) is eps*(x, t) = -sqrt(1 - abar_t) grad log p_t(x).

:func:`gmm_eps` has the denoiser signature ``apply(params, x, t, cond)`` so the
samplers of :mod:`diverify.diffusion.schedulers` run on it unchanged, and
because it is a closed-form JAX function the end-to-end Jacobian of a
deterministic DDIM chain is exact up to float rounding (:func:`ddim_jacobian`,
``jax.jacfwd`` through every step). That makes it the ground truth against
which Lipschitz bounds are tested.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diverify.diffusion.schedulers import NoiseSchedule, SamplingSchedule, trajectory
from diverify.errors import DiverifyError


class GaussianMixture(NamedTuple):
    """Mixture parameters (a pytree) plus the abar table the timesteps index."""

    weights: jax.Array  # (K,), positive, sum 1
    means: jax.Array  # (K, d)
    stds: jax.Array  # (K,), s_k > 0
    alphas_cumprod: jax.Array  # (N,)


def gaussian_mixture(weights, means, stds, noise: NoiseSchedule) -> GaussianMixture:
    """Validated float32 mixture parameters for the forward process of ``noise``."""
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    stds = np.asarray(stds, np.float64)
    if means.ndim != 2 or weights.shape != (means.shape[0],) or stds.shape != (means.shape[0],):
        raise DiverifyError(f"mixture needs weights (K,), means (K, d), stds (K,); got shapes "
                            f"{weights.shape}, {means.shape}, {stds.shape}")
    if np.any(weights <= 0) or abs(weights.sum() - 1) > 1e-6:
        raise DiverifyError("mixture weights must be positive and sum to 1")
    if np.any(stds <= 0):
        raise DiverifyError("mixture standard deviations must be positive")
    return GaussianMixture(jnp.asarray(weights, jnp.float32), jnp.asarray(means, jnp.float32),
                           jnp.asarray(stds, jnp.float32), jnp.asarray(noise.alphas_cumprod, jnp.float32))


def _component_terms(gmm: GaussianMixture, x: jax.Array, abar: jax.Array, log_weights: jax.Array):
    """Per-component log(w_k N_k(x)) (B, K), centred x - m_k (B, K, d) and variances v_k (B, K)."""
    d = x.shape[-1]
    abar = abar[:, None]
    var = abar * gmm.stds[None, :] ** 2 + (1 - abar)
    centred = x[:, None, :] - jnp.sqrt(abar)[..., None] * gmm.means[None]
    sq = jnp.sum(centred * centred, axis=-1)
    log_terms = log_weights - 0.5 * sq / var - 0.5 * d * jnp.log(2 * jnp.pi * var)
    return log_terms, centred, var


def _weights(gmm: GaussianMixture, cond, batch: int) -> jax.Array:
    if cond is None:
        return jnp.broadcast_to(jnp.log(gmm.weights), (batch, gmm.weights.shape[0]))
    if np.shape(cond) != (batch, gmm.weights.shape[0]):
        raise DiverifyError(f"mixture conditioning must be per-sample component weights of shape "
                            f"({batch}, {gmm.weights.shape[0]}), got {np.shape(cond)}")
    return jnp.log(cond)


def log_density(gmm: GaussianMixture, x: jax.Array, abar: jax.Array, cond=None) -> jax.Array:
    """log p_t(x) for x (B, d) at noise level abar (B,); ``cond`` optionally replaces the weights per sample."""
    log_terms, _, _ = _component_terms(gmm, x, abar, _weights(gmm, cond, x.shape[0]))
    return jax.nn.logsumexp(log_terms, axis=-1)


def score(gmm: GaussianMixture, x: jax.Array, abar: jax.Array, cond=None) -> jax.Array:
    """grad_x log p_t(x) in closed form, (B, d)."""
    log_terms, centred, var = _component_terms(gmm, x, abar, _weights(gmm, cond, x.shape[0]))
    resp = jax.nn.softmax(log_terms, axis=-1)
    return -jnp.sum((resp / var)[..., None] * centred, axis=1)


def gmm_eps(gmm: GaussianMixture, x: jax.Array, t: jax.Array, cond=None) -> jax.Array:
    """The exact eps-prediction -sqrt(1 - abar_t) * score_t(x); x (B, d), integer t (B,) or scalar."""
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    abar = jnp.take(gmm.alphas_cumprod, t)
    return -jnp.sqrt(1 - abar)[:, None] * score(gmm, x, abar, cond)


def sample_data(gmm: GaussianMixture, key: jax.Array, n: int) -> jax.Array:
    """n exact samples of p_0, (n, d)."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, gmm.weights.shape[0], (n,), p=gmm.weights)
    z = jax.random.normal(k_noise, (n, gmm.means.shape[1]))
    return gmm.means[comp] + gmm.stds[comp][:, None] * z


def moments(gmm: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean (d,) and covariance (d, d) of p_0, in float64."""
    w = np.asarray(gmm.weights, np.float64)
    mu = np.asarray(gmm.means, np.float64)
    s = np.asarray(gmm.stds, np.float64)
    mean = w @ mu
    second = np.einsum("k,ki,kj->ij", w, mu, mu) + np.eye(mu.shape[1]) * float(w @ s ** 2)
    return mean, second - np.outer(mean, mean)


def ddim_map(gmm: GaussianMixture, schedule: SamplingSchedule, cond=None):
    """The deterministic sampler as a function x_T (d,) -> x_0 (d,); requires a DDIM schedule with eta = 0."""
    if schedule.kind != "ddim" or schedule.eta != 0:
        raise DiverifyError("the end-to-end map is deterministic only for DDIM with eta = 0")

    def run(x_T: jax.Array) -> jax.Array:
        c = None if cond is None else jnp.asarray(cond)[None]
        return trajectory(gmm_eps, gmm, x_T[None], c, schedule)[-1][0]

    return run


def ddim_jacobian(gmm: GaussianMixture, schedule: SamplingSchedule, x_T: jax.Array, cond=None) -> jax.Array:
    """The exact Jacobian d x_0 / d x_T (d, d) of the deterministic DDIM chain at x_T (forward-mode autodiff)."""
    return jax.jacfwd(ddim_map(gmm, schedule, cond))(jnp.asarray(x_T, jnp.float32))
