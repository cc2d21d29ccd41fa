"""Perturbation sets (input specifications), kept apart from the bound engine.

An input set knows three things: its centre (used to trace the function),
an elementwise interval that contains it (used by interval methods), and how
to minimise a linear function over itself (used to *concretise* linear
bounds): ``minimize_linear(A) = min_{x in set} <A_s, x>`` for every row ``s``
of ``A`` (shape ``(S, *x.shape)``). All are frozen dataclasses registered as
pytrees, so they pass through ``jit`` and ``vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError

Array = jax.Array


class InputSet(Protocol):
    center: Array

    def interval(self) -> tuple[Array, Array]: ...

    def minimize_linear(self, a: Array) -> Array: ...


def _sum_rows(x: Array) -> Array:
    return x.reshape(x.shape[0], -1).sum(axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Box:
    """The box ``{x : lower <= x <= upper}`` (elementwise)."""

    lower: Array
    upper: Array

    @property
    def center(self) -> Array:
        return (self.lower + self.upper) / 2

    def interval(self) -> tuple[Array, Array]:
        return self.lower, self.upper

    def minimize_linear(self, a: Array) -> Array:
        return _sum_rows(jnp.maximum(a, 0) * self.lower + jnp.minimum(a, 0) * self.upper)


_DUAL = {np.inf: 1.0, 2.0: 2.0, 1.0: np.inf}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LpBall:
    """Product of l_p balls: ``x = center + delta`` where, for every index of the
    leading axes, the slice ``delta[..., :]`` along the last axis (e.g. one token's
    embedding) has ``||delta||_p <= eps``, and ``delta = 0`` where ``mask`` is 0.

    ``mask`` (broadcastable to ``center``'s leading axes + a trailing 1) selects
    the perturbed slices (e.g. token positions). With ``p = inf`` this is the
    elementwise box ``|delta| <= eps * mask``. Concretisation uses Hoelder's
    inequality per slice: ``min <A, x> = <A, center> - eps * sum ||A_slice||_q``
    with ``1/p + 1/q = 1``; it is exact.
    """

    center: Array
    eps: Array
    mask: Array
    p: float = dataclasses.field(metadata=dict(static=True), default=np.inf)

    def interval(self) -> tuple[Array, Array]:
        radius = self.eps * self.mask
        return self.center - radius, self.center + radius

    def minimize_linear(self, a: Array) -> Array:
        masked = a * self.mask
        q = _DUAL[float(self.p)]
        if q == 1.0:
            dual = jnp.sum(jnp.abs(masked), axis=-1)
        elif q == 2.0:
            dual = jnp.sqrt(jnp.sum(masked * masked, axis=-1))
        else:
            dual = jnp.max(jnp.abs(masked), axis=-1)
        return _sum_rows(a * self.center) - self.eps * _sum_rows(dual)


def lp_ball(center, eps, p=np.inf, mask=None) -> LpBall:
    """Build an :class:`LpBall`, checking the user's numbers.

    ``mask=None`` perturbs every slice; otherwise it must broadcast against
    ``center`` (e.g. shape ``(batch, length, 1)`` selecting token positions).
    """
    center = jnp.asarray(center, jnp.float32)
    p = float(p)
    if p not in _DUAL:
        raise DiverifyError(f"norm p={p:g} is not supported: use 1, 2 or inf")
    eps_arr = np.asarray(eps, dtype=np.float64)
    if not np.all(np.isfinite(eps_arr)):
        raise DiverifyError(f"eps must be finite, got {eps}")
    if np.any(eps_arr < 0):
        raise DiverifyError(f"eps must be >= 0, got {eps}")
    if mask is None:
        mask = jnp.ones(center.shape[:-1] + (1,), jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    try:
        jnp.broadcast_shapes(mask.shape, center.shape)
    except ValueError:
        raise DiverifyError(f"mask of shape {mask.shape} does not broadcast to the input's shape {center.shape}") from None
    return LpBall(center=center, eps=jnp.asarray(eps, jnp.float32), mask=mask, p=p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Substitution:
    """Substitution set: at each chosen position the slice (e.g. a word embedding)
    ranges over the convex hull of a few candidate vectors; elsewhere it is fixed.

    ``base`` has the input's shape ``(..., L, H)`` with the chosen positions'
    slices ignored; ``positions`` (int array ``(P,)``) index axis -2 (all leading
    axes share them); ``candidates`` has shape ``(P, K, H)`` (pad a shorter list by
    repeating a candidate). A linear function attains its minimum over a
    polytope at a vertex, so ``minimize_linear`` is exact: the fixed part plus,
    per position, the minimum over its K candidates.
    """

    base: Array
    positions: Array
    candidates: Array

    @property
    def center(self) -> Array:
        return self.base.at[..., self.positions, :].set(jnp.mean(self.candidates, axis=1))

    def interval(self) -> tuple[Array, Array]:
        lo = self.base.at[..., self.positions, :].set(jnp.min(self.candidates, axis=1))
        hi = self.base.at[..., self.positions, :].set(jnp.max(self.candidates, axis=1))
        return lo, hi

    def minimize_linear(self, a: Array) -> Array:
        fixed = self.base.at[..., self.positions, :].set(0.0)
        at_positions = a[..., self.positions, :]  # (S, ..., P, H)
        scores = jnp.einsum("s...ph,pkh->s...pk", at_positions, self.candidates)
        best = jnp.min(scores, axis=-1)
        return _sum_rows(a * fixed) + _sum_rows(best)


def substitution(base, positions, candidates) -> Substitution:
    """Build a :class:`Substitution`, checking shapes and emptiness."""
    base = jnp.asarray(base, jnp.float32)
    positions = np.asarray(positions, dtype=np.int32).reshape(-1)
    if positions.size == 0:
        raise DiverifyError("a substitution set needs at least one position")
    length = base.shape[-2]
    bad = [int(p) for p in positions if not -length <= p < length]
    if bad:
        raise DiverifyError(f"substitution position(s) {bad} out of range for a sequence of length {length}")
    candidates = [np.asarray(c, dtype=np.float32) for c in candidates]
    if len(candidates) != positions.size:
        raise DiverifyError(f"{positions.size} positions but {len(candidates)} candidate lists")
    for p, c in zip(positions, candidates):
        if c.ndim != 2 or c.shape[0] == 0:
            raise DiverifyError(f"empty substitution list for position {int(p)}")
        if c.shape[1] != base.shape[-1]:
            raise DiverifyError(f"candidates for position {int(p)} have width {c.shape[1]}, expected {base.shape[-1]}")
    k = max(c.shape[0] for c in candidates)
    padded = np.stack([np.concatenate([c, np.repeat(c[:1], k - c.shape[0], axis=0)]) for c in candidates])
    return Substitution(base=base, positions=jnp.asarray(positions), candidates=jnp.asarray(padded))
