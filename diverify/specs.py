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
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError

Array = jax.Array
#: Products in concretisation run at full float32 precision (a GPU's default uses TF32).
HIGHEST = jax.lax.Precision.HIGHEST


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

    ``support`` (static: part of the pytree's structure, known when a program is
    compiled), when given, lists the only slices that may move, as flat indices over
    the leading axes (for one prompt of shape ``(1, L, H)``: token positions);
    ``delta = 0`` in every other slice whatever ``mask`` says there
    (:attr:`active_mask`). The mask stays data (``vmap``-able, one compilation for
    every radius); the support lets a bound engine make symbols for those slices
    only (:mod:`diverify.bounds.zonotope`: one token of eight, 8x fewer input
    symbols).
    """

    center: Array
    eps: Array
    mask: Array
    p: float = dataclasses.field(metadata=dict(static=True), default=np.inf)
    support: tuple | None = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def active_mask(self) -> Array:
        """``mask`` with the slices outside ``support`` set to 0 (``mask`` itself without a support)."""
        if self.support is None:
            return self.mask
        lead = tuple(jnp.shape(self.center)[:-1])
        inside = np.zeros(math.prod(lead), np.float32)
        inside[list(self.support)] = 1.0
        return self.mask * inside.reshape(lead + (1,))

    def interval(self) -> tuple[Array, Array]:
        radius = self.eps * self.active_mask
        return self.center - radius, self.center + radius

    def minimize_linear(self, a: Array) -> Array:
        masked = a * self.active_mask
        q = _DUAL[float(self.p)]
        if q == 1.0:
            dual = jnp.sum(jnp.abs(masked), axis=-1)
        elif q == 2.0:
            dual = jnp.sqrt(jnp.sum(masked * masked, axis=-1))
        else:
            dual = jnp.max(jnp.abs(masked), axis=-1)
        return _sum_rows(a * self.center) - self.eps * _sum_rows(dual)


def lp_ball(center, eps, p=np.inf, mask=None, support=None) -> LpBall:
    """Build an :class:`LpBall`, checking the user's numbers.

    ``mask=None`` perturbs every slice; otherwise it must broadcast against
    ``center`` (e.g. shape ``(batch, length, 1)`` selecting token positions).
    ``support``: the flat indices (over the leading axes) of the only slices that
    may move (see :class:`LpBall`); the mask is set to 0 outside them.
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
    if support is not None:
        support = tuple(sorted({int(i) for i in support}))
        _check_support(support, center.shape)
    ball = LpBall(center=center, eps=jnp.asarray(eps, jnp.float32), mask=mask, p=p, support=support)
    return dataclasses.replace(ball, mask=ball.active_mask)


def _check_support(support: tuple, shape: tuple) -> None:
    slices = math.prod(shape[:-1])
    if not support or any(not 0 <= i < slices for i in support) or len(set(support)) != len(support):
        raise DiverifyError(f"an LpBall's support must list distinct slices in 0..{slices - 1} "
                            f"(flat indices over the leading axes of {tuple(shape)}), got {support}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AffineBall:
    """The image of the unit l2 ball under an affine map, plus a box:
    ``x = center + sum_k u_k generators[k] + e`` with ``||u||_2 <= 1`` and ``|e| <= half``
    elementwise (``generators`` of shape ``(m, *center.shape)``, ``half >= 0`` of ``center``'s).

    The set an l2 ball becomes after a map bounded by a zonotope
    (:func:`diverify.bounds.zonotope.l2_parts`), so that it can be the next map's input
    without rounding it to a ball or a box (the reach chain of :mod:`diverify.lipschitz`).
    Concretisation is exact: ``min <a, x> = <a, center> - ||(<a, g_k>)_k||_2 - <|a|, half>``
    (Cauchy-Schwarz for the ball's image, attained; the box term per element).
    """

    center: Array
    generators: Array
    half: Array

    def interval(self) -> tuple[Array, Array]:
        radius = jnp.sqrt(jnp.sum(self.generators * self.generators, axis=0)) + self.half
        return self.center - radius, self.center + radius

    def minimize_linear(self, a: Array) -> Array:
        rows = a.reshape(a.shape[0], -1)
        proj = jnp.matmul(rows, self.generators.reshape(self.generators.shape[0], -1).T, precision=HIGHEST)
        return _sum_rows(a * self.center) - jnp.sqrt(jnp.sum(proj * proj, axis=1)) - _sum_rows(jnp.abs(a) * self.half)


def affine_ball(center, generators, half=None) -> AffineBall:
    """Build an :class:`AffineBall`, checking shapes and signs. All three arrays take ``center``'s
    float type: float32 (JAX arrays), or float64 for a NumPy float64 centre (kept as NumPy arrays,
    so that they stay float64 outside ``jax.enable_x64``)."""
    wide = isinstance(center, np.ndarray) and center.dtype == np.float64

    def array(x):
        return np.asarray(x, np.float64) if wide else jnp.asarray(x, jnp.float32)

    center, generators = array(center), array(generators)
    half = array(np.zeros(center.shape) if half is None else half)
    if generators.ndim < 1 or tuple(generators.shape[1:]) != tuple(center.shape):
        raise DiverifyError(f"an AffineBall's generators need shape (m, *{tuple(center.shape)}), "
                            f"got {tuple(generators.shape)}")
    if tuple(half.shape) != tuple(center.shape):
        raise DiverifyError(f"an AffineBall's half-widths need shape {tuple(center.shape)}, got {tuple(half.shape)}")
    ball = AffineBall(center, generators, half)
    check_set(ball, "AffineBall")
    return ball


def check_set(input_set, where: str = "input set") -> None:
    """Raise a :class:`DiverifyError` unless ``input_set``'s numbers describe a set: every float
    finite, an :class:`LpBall`'s ``eps`` and ``mask`` >= 0, a :class:`Box`'s ``lower <= upper``, an
    :class:`AffineBall`'s ``half`` >= 0.

    Sets built field by field (``LpBall(center, eps, p)`` puts ``p`` into ``mask``) bypass the
    checks of :func:`lp_ball`; this catches them before they reach a bound. Traced values (under
    ``jit``/``vmap``) are not checked.
    """
    try:
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(input_set)]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    for x in leaves:
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise DiverifyError(f"{where}: {type(input_set).__name__} holds NaN or infinite numbers"
                                + (" (build it with diverify.specs.lp_ball)" if isinstance(input_set, LpBall) else ""))
    if isinstance(input_set, LpBall):
        if np.any(np.asarray(input_set.eps) < 0):
            raise DiverifyError(f"{where}: eps must be >= 0, got {np.asarray(input_set.eps)}")
        if np.any(np.asarray(input_set.mask) < 0):
            raise DiverifyError(f"{where}: an LpBall's mask must be >= 0 (build it with diverify.specs.lp_ball)")
        if input_set.support is not None:
            _check_support(tuple(input_set.support), np.shape(input_set.center))
    if isinstance(input_set, Box) and np.any(np.asarray(input_set.lower) > np.asarray(input_set.upper)):
        raise DiverifyError(f"{where}: a Box needs lower <= upper everywhere")
    if isinstance(input_set, AffineBall) and np.any(np.asarray(input_set.half) < 0):
        raise DiverifyError(f"{where}: an AffineBall's half-widths must be >= 0")


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
        scores = jnp.einsum("s...ph,pkh->s...pk", at_positions, self.candidates, precision=HIGHEST)
        best = jnp.min(scores, axis=-1)
        return _sum_rows(a * fixed) + _sum_rows(best)


def linear_range(input_set, terms: Array) -> tuple[Array, Array]:
    """``(min, max)`` over ``x`` in ``input_set`` of ``<terms[..., k], x>`` for every index ``k`` of
    ``terms``' trailing axes (``terms``: shape ``center.shape + out_shape``; returns two arrays of
    ``out_shape``).

    The numbers :meth:`minimize_linear` gives for the rows ``terms`` moved to the front, computed
    in ``terms``' own layout for a :class:`Box` and an :class:`LpBall`: contractions over the set's
    axes instead of a transpose of every term (tiny-BERT's zonotope bound: 40 ms of 115 ms were
    those transposes). A box: ``min = <lower, a^+> + <upper, a^->`` (and its mirror), exact; an
    l_p ball: ``<a, center> -+ eps sum ||(a * mask)_slice||_q``, Hoelder's bound per slice, exact.
    Other sets move the rows to the front and call :meth:`minimize_linear`.
    """
    n = jnp.ndim(input_set.center)
    out = terms.shape[n:]

    def contract(x, t):
        return jnp.tensordot(x, t, axes=n, precision=HIGHEST)

    if isinstance(input_set, Box):
        pos, neg = jnp.maximum(terms, 0), jnp.minimum(terms, 0)
        return (contract(input_set.lower, pos) + contract(input_set.upper, neg),
                contract(input_set.upper, pos) + contract(input_set.lower, neg))
    if isinstance(input_set, LpBall):
        centre = contract(input_set.center, terms)
        mask = input_set.active_mask
        q = _DUAL[float(input_set.p)]
        if q == 1.0:
            dual = contract(jnp.broadcast_to(mask, input_set.center.shape), jnp.abs(terms))
        else:
            masked = terms * jnp.reshape(mask, jnp.shape(mask) + (1,) * len(out))
            per_slice = (jnp.sqrt(jnp.sum(masked * masked, axis=n - 1)) if q == 2.0
                         else jnp.max(jnp.abs(masked), axis=n - 1))
            dual = jnp.sum(per_slice, axis=tuple(range(n - 1)))
        return centre - input_set.eps * dual, centre + input_set.eps * dual
    rows = jnp.moveaxis(terms.reshape(tuple(input_set.center.shape) + (-1,)), -1, 0)
    return input_set.minimize_linear(rows).reshape(out), -input_set.minimize_linear(-rows).reshape(out)


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


_MATRIX_NORMS = ("inf", "fro", "nuclear")

#: Relative padding of a float32 spectral norm (the SVD's singular values are
#: accurate to a small multiple of ``n * eps_32 * ||A||_2``; 1e-4 covers n <= ~1000).
_SPECTRAL_PADDING = 1e-4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MatrixBall:
    """A ball of matrices ``{center + D : ||D|| <= radius}`` (``center`` of shape ``(m, n)``) in a matrix norm.

    ``norm``: ``"inf"`` (max entry), ``"fro"`` (Frobenius) or ``"nuclear"``
    (sum of singular values). The nuclear ball of radius ``r`` is the convex
    hull of the rank-one edits ``{u v^T : ||u||_2 ||v||_2 <= r}`` (the shape of
    ROME / EvilEdit edits), so a linear bound valid on it is valid on every
    rank-one edit of that size, and concretisation over the hull loses nothing.

    Every entry satisfies ``|D_ij| <= radius`` in all three norms (the
    interval). Concretisation is exact by norm duality,
    ``min <A, center + D> = <A, center> - radius * ||A||_dual`` with duals
    l_1 (entrywise), Frobenius and spectral. The spectral norm is computed by
    an SVD in float32 and padded by the relative margin ``_SPECTRAL_PADDING``
    times the Frobenius norm (an upper bound on the SVD's error).
    """

    center: Array
    radius: Array
    norm: str = dataclasses.field(metadata=dict(static=True), default="fro")

    def interval(self) -> tuple[Array, Array]:
        return self.center - self.radius, self.center + self.radius

    def dual_norms(self, a: Array) -> Array:
        """``||A_s||_dual`` for every row ``A_s`` of ``a`` (shape ``(S, m, n)``)."""
        if self.norm == "inf":
            return jnp.sum(jnp.abs(a), axis=(1, 2))
        fro = jnp.sqrt(jnp.sum(a * a, axis=(1, 2)))
        if self.norm == "fro":
            return fro
        spectral = jnp.linalg.norm(a, ord=2, axis=(1, 2))
        return jnp.minimum(spectral + _SPECTRAL_PADDING * fro, fro)

    def minimize_linear(self, a: Array) -> Array:
        return _sum_rows(a * self.center) - self.radius * self.dual_norms(a)

    def image_radius(self, x: Array) -> Array:
        """Elementwise bound on ``|x (D)|`` over the ball, shape ``(L, n)`` for ``x`` of shape ``(L, m)``.

        ``|x_l . D_j| <= ||x_l||_1 max|D_ij|`` (inf), ``<= ||x_l||_2 ||D_j||_2 <= ||x_l||_2 r``
        (Frobenius, and nuclear since ``||D_j||_2 <= ||D||_2 <= ||D||_*``); all are attained.
        """
        per_row = jnp.sum(jnp.abs(x), -1) if self.norm == "inf" else jnp.sqrt(jnp.sum(x * x, -1))
        return jnp.broadcast_to((self.radius * per_row)[:, None], (x.shape[0], self.center.shape[1]))


def matrix_ball(center, radius, norm: str = "fro") -> MatrixBall:
    """Build a :class:`MatrixBall` (``norm``: inf, fro or nuclear), checking the user's numbers."""
    center = jnp.asarray(center, jnp.float32)
    if center.ndim != 2:
        raise DiverifyError(f"a matrix ball needs a 2-D centre, got shape {tuple(center.shape)}")
    if norm not in _MATRIX_NORMS:
        raise DiverifyError(f"matrix norm {norm!r} is not supported: use one of {', '.join(_MATRIX_NORMS)}")
    r = float(np.asarray(radius))
    if not np.isfinite(r) or r < 0:
        raise DiverifyError(f"the radius must be finite and >= 0, got {radius}")
    return MatrixBall(center=center, radius=jnp.asarray(r, jnp.float32), norm=norm)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseImage:
    """The set ``{x @ D : D in ball}`` a fixed input ``x`` (shape ``(L, m)``) reaches through a matrix ball.

    A layer ``y = x W + b`` whose input ``x`` does not depend on the edit
    ``W -> W + D`` moves its output by ``x D``; this set is *exactly* the set
    of those moves, so bounding a model over it (as a term added to the
    layer's output) is the same problem as bounding it over the edits, with
    ``L * n`` instead of ``m * n`` perturbed coordinates.

    ``min <B, x D> = min <x^T B, D>`` is the ball's own concretisation. For
    the Frobenius and nuclear balls, ``x^T = Q R`` (thin QR, ``Q`` with
    orthonormal columns) gives ``||x^T B|| = ||R B||`` (both norms are
    invariant under ``Q``), an ``(L, n)`` instead of an ``(m, n)`` problem per
    row; the float32 QR's error (backward stable: ``||x^T - QR|| <= c m eps ||x||``)
    is covered by padding the dual norm with ``1e-4 ||x||_F ||B||_F``.
    Build it with :func:`dense_image`.
    """

    ball: MatrixBall
    x: Array
    r_factor: Array

    @property
    def center(self) -> Array:
        return jnp.matmul(self.x, self.ball.center, precision=HIGHEST)

    def interval(self) -> tuple[Array, Array]:
        r = self.ball.image_radius(self.x)
        return self.center - r, self.center + r

    def minimize_linear(self, a: Array) -> Array:
        if self.ball.norm == "inf":
            def one(b):
                return self.ball.minimize_linear(jnp.einsum("lo,li->io", b, self.x, precision=HIGHEST)[None])[0]
            return jax.lax.map(one, a, batch_size=16)
        reduced = jnp.einsum("slo,kl->sko", a, self.r_factor, precision=HIGHEST)
        b_fro = jnp.sqrt(jnp.sum(a * a, axis=(1, 2)))
        pad = _SPECTRAL_PADDING * jnp.sqrt(jnp.sum(self.x * self.x)) * b_fro
        dual = self.ball.dual_norms(reduced) + pad
        return _sum_rows(a * self.center) - self.ball.radius * dual


def dense_image(x, ball: MatrixBall) -> DenseImage:
    """The :class:`DenseImage` of ``ball`` through the fixed layer input ``x`` (shape ``(L, m)``)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[1] != ball.center.shape[0]:
        raise DiverifyError(f"layer input of shape {tuple(x.shape)} does not fit a matrix of shape "
                            f"{tuple(ball.center.shape)}")
    _, r_factor = jnp.linalg.qr(x.T, mode="reduced")
    return DenseImage(ball=ball, x=x, r_factor=r_factor)
