"""CWS training (paper eq. 12): minimise the Gaussian-smoothed loss ``E_eps L(theta + eps)``.

The gradient of the smoothed loss is ``E_eps grad L(theta + eps)``; each step
estimates it with ``num_noise`` draws in a perturbation's coordinates (the
same :class:`~diverify.cws.sampling.Perturbation` the certificate uses, so a
model is trained for exactly the noise it will be certified under) and hands
it to any ``optax`` optimiser.  For rank-one coordinates the noise is applied
around the current weights (``u = v = 0``), i.e. the model is trained to be
insensitive to random rank-one edits of the selected matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diverify.cws.sampling import Params, Perturbation, apply_coordinates, sample_coordinates

Loss = Callable[[Params, Any], jax.Array]


def smoothed_loss(loss_fn: Loss, params: Params, batch: Any, perturbation: Perturbation, sigma: float,
                  key: jax.Array, num_noise: int) -> jax.Array:
    """Monte-Carlo estimate of ``E_eps loss_fn(theta + eps, batch)`` from ``num_noise`` draws (unbiased)."""
    def one(i):
        coords = sample_coordinates(perturbation, jax.random.fold_in(key, i), jnp.float32(sigma))
        return loss_fn(apply_coordinates(perturbation, params, coords), batch)

    return jnp.mean(jax.vmap(one)(jnp.arange(num_noise, dtype=jnp.uint32)))


def _smoothed_step(loss_fn: Loss, optimizer: optax.GradientTransformation, perturbation: Perturbation,
                   num_noise: int, params, opt_state, batch, key, sigma):
    value, grads = jax.value_and_grad(smoothed_loss, argnums=1)(
        loss_fn, params, batch, perturbation, sigma, key, num_noise)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


# Module-level jit with sigma traced: one compilation serves every sigma of a sweep.
_jitted_step = jax.jit(_smoothed_step, static_argnums=(0, 1, 2, 3))


def make_smoothed_train_step(loss_fn: Loss, optimizer: optax.GradientTransformation, perturbation: Perturbation,
                             sigma: float, num_noise: int):
    """A jitted ``step(params, opt_state, batch, key) -> (params, opt_state, smoothed_loss)``.

    Pure: the noise comes only from ``key`` (fold it with the step number).
    ``sigma`` is a traced argument of the compiled step, so steps built for
    several sigmas with the same ``loss_fn`` and ``optimizer`` objects share
    one compilation.
    """
    sigma = jnp.float32(sigma)

    def step(params, opt_state, batch, key):
        return _jitted_step(loss_fn, optimizer, perturbation, num_noise, params, opt_state, batch, key, sigma)

    return step
