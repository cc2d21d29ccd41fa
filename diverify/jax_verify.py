"""Migration path for jax_verify users: its entry points, names and argument order.

jax_verify (DeepMind) no longer imports with current JAX. Code written for it
ports by changing one import::

    import diverify.jax_verify as jax_verify

    bound = jax_verify.IntervalBound(x - eps, x + eps)
    out = jax_verify.backward_crown_bound_propagation(fn, bound)
    out.lower, out.upper

Every argument of ``function`` that is an :class:`IntervalBound` is perturbed;
plain arrays are constants. The result mirrors ``function``'s output (an
:class:`IntervalBound`, or a pytree of them), as in jax_verify.
"""

from __future__ import annotations

from typing import Callable

from diverify.bounds.api import bound
from diverify.bounds.interval import IntervalBound

__all__ = [
    "IntervalBound",
    "interval_bound_propagation",
    "backward_crown_bound_propagation",
    "forward_crown_bound_propagation",
    "crownibp_bound_propagation",
]


def interval_bound_propagation(function: Callable, *bounds):
    """jax_verify's IBP: interval arithmetic through ``function``."""
    return bound(function, *bounds, method="ibp").output


def backward_crown_bound_propagation(function: Callable, *bounds):
    """jax_verify's backward CROWN: linear relaxations back-substituted to the inputs,
    with CROWN intermediate bounds."""
    return bound(function, *bounds, method="crown").output


def forward_crown_bound_propagation(function: Callable, *bounds):
    """jax_verify's forward CROWN: linear bounds propagated forward from the inputs."""
    return bound(function, *bounds, method="forward").output


def crownibp_bound_propagation(function: Callable, *bounds):
    """jax_verify's CROWN-IBP: backward CROWN on IBP intermediate bounds."""
    return bound(function, *bounds, method="crown-ibp").output
