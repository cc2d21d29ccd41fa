"""Seeded, sharded Monte-Carlo sampling of noisy weights for CWS.

A :class:`Perturbation` names the coordinates the noise lives in and how a
coordinate vector ``z`` changes the parameters:

* ``kind="weights"``: ``z`` is a pytree shaped like the selected parameter
  leaves and ``theta' = theta + z`` on those leaves (the others stay clean).
  The certificate's ``||delta||_2`` is the l_2 norm of the concatenated
  weight change (the Frobenius norm for a single matrix).
* ``kind="rank_one"``: for each selected matrix ``W`` (flax kernel, shape
  ``[in, out]``) the coordinates are ``(u in R^in, v in R^out)`` and
  ``W' = W + u v^T``; the base point is ``u = v = 0`` (the clean model).
  The certificate's ``||delta||_2`` is then the l_2 norm of the *coordinates*
  ``sqrt(sum_i ||u_i||^2 + ||v_i||^2)``, not of the weight change.  A rank-one
  edit ``D = u v^T`` can be written with coordinates of norm
  ``min_c sqrt(c^2 ||u||^2 + ||v||^2 / c^2) = sqrt(2 ||D||_F)``, so a radius
  ``R`` in these coordinates covers every rank-one edit of the selected
  matrices with ``sum_i 2 ||D_i||_F <= R^2``, i.e. a single matrix's edit
  with ``||D||_F <= R^2 / 2``; it says nothing about edits of higher rank.
  The smoothed model is ``E pred(theta + (u + e_u)(v + e_v)^T)``, which
  differs from the weight-space smoothed model.

Each sample's noise is drawn from ``jax.random.fold_in(key, i)`` for its
global index ``i``, so counts depend only on the key and the number of
samples, never on the chunk size, the number of devices or of processes.
Samples are split over processes (``jax.distributed``) by index (process
``p`` of ``P`` takes ``i = p, p + P, ...``) and, within a process, each
chunk is sharded over the local devices with a ``NamedSharding`` on a 1-D
``("samples",)`` mesh; the per-process counts are summed at the end.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diverify import xla_options
from diverify.errors import DiverifyError

Params = Any
Predicate = Callable[[Params], jax.Array]


def path_string(key_path: Iterable[Any]) -> str:
    """``"encoder/layer/0/attention/self/key/kernel"`` for a ``jax.tree_util`` key path."""
    parts = []
    for entry in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def param_paths(params: Params) -> tuple[str, ...]:
    """All leaf paths of a parameter pytree, in ``tree_flatten`` order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return tuple(path_string(kp) for kp, _ in leaves)


def _matches(path: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def select_paths(params: Params, pattern: str | None) -> tuple[str, ...]:
    """Leaf paths matching ``pattern``; ``None`` or ``"*"`` selects every leaf.

    ``pattern`` is a comma-separated list of globs (``*`` also crosses ``/``,
    e.g. ``"*attention/self/key/kernel,*attention/self/value/kernel"``) or of
    regular expressions prefixed by ``re:`` (searched anywhere in the path).
    A pattern that matches nothing is an error listing some available paths.
    """
    paths = param_paths(params)
    if pattern is None or pattern.strip() in ("", "*"):
        return paths
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    for part in parts:
        if part.startswith("re:"):
            try:
                re.compile(part[3:])
            except re.error as err:
                raise DiverifyError(f"--params pattern {part!r} is not a valid regex: {err}") from None
    chosen = tuple(p for p in paths if any(_matches(p, part) for part in parts))
    if not chosen:
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise DiverifyError(f"--params pattern {pattern!r} matches no parameter; available paths include: {shown}")
    return chosen


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """The coordinates the smoothing noise lives in (see the module docstring).

    ``paths`` are the perturbed leaves with their ``shapes`` and ``dtypes``.
    ``rows[i]`` (``"weights"`` only) is ``None`` or the row indices of leaf
    ``i`` that are sampled: a predicate that reads only those rows (an
    embedding table gathered at a few token ids) has exactly the same
    distribution of outcomes with or without noise on the other rows, so
    they are skipped (see :func:`restrict_rows`).  Hashable, so it can be a
    static argument of ``jit``.
    """

    kind: Literal["weights", "rank_one"]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    rows: tuple[tuple[int, ...] | None, ...] = ()

    def _coordinate_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        if self.kind == "rank_one":
            return [((s[0],), (s[1],)) for s in self.shapes]
        rows = self.rows or (None,) * len(self.shapes)
        return [((s if r is None else (len(r),) + s[1:]),) for s, r in zip(self.shapes, rows)]

    @property
    def num_coordinates(self) -> int:
        """Dimension of the sampled noise (the ``d`` of ``N(0, sigma^2 I_d)`` actually drawn)."""
        return int(sum(math.prod(part) for parts in self._coordinate_shapes() for part in parts))

    @property
    def num_weights(self) -> int:
        """Number of weights the smoothing is defined over (all entries of the selected leaves)."""
        return int(sum(math.prod(s) for s in self.shapes))


def weight_perturbation(params: Params, pattern: str | None = None) -> Perturbation:
    """Isotropic noise on every leaf selected by ``pattern`` (all leaves by default)."""
    chosen = set(select_paths(params, pattern))
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    picked = [(path_string(kp), leaf) for kp, leaf in leaves if path_string(kp) in chosen]
    return Perturbation(kind="weights", paths=tuple(p for p, _ in picked),
                        shapes=tuple(tuple(leaf.shape) for _, leaf in picked),
                        dtypes=tuple(str(leaf.dtype) for _, leaf in picked))


def restrict_rows(perturbation: Perturbation, rows_by_path: dict[str, Iterable[int]]) -> Perturbation:
    """Sample only the given rows of some perturbed leaves (the predicate must read no other row).

    Sound and exact when the predicate does not depend on the skipped rows:
    its outcome has the same distribution, and an edit ``delta`` moves the
    smoothed probability at most as much as its part on the sampled rows,
    whose norm is at most ``||delta||_2``.  Paths not perturbed are ignored.
    """
    if perturbation.kind != "weights":
        raise DiverifyError("row restriction applies to weight-space noise only")
    rows = list(perturbation.rows or (None,) * len(perturbation.paths))
    for i, (path, shape) in enumerate(zip(perturbation.paths, perturbation.shapes)):
        if path in rows_by_path:
            chosen = tuple(sorted({int(r) for r in rows_by_path[path]}))
            if not chosen or chosen[0] < 0 or chosen[-1] >= shape[0]:
                raise DiverifyError(f"rows of {path} must be non-empty indices below {shape[0]}")
            rows[i] = chosen
    return dataclasses.replace(perturbation, rows=tuple(rows))


def rank_one_perturbation(params: Params, pattern: str) -> Perturbation:
    """Noise on ``(u, v)`` with edits ``W + u v^T`` of every 2-D leaf selected by ``pattern``."""
    chosen = set(select_paths(params, pattern))
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    picked = [(path_string(kp), leaf) for kp, leaf in leaves if path_string(kp) in chosen]
    not_matrices = [p for p, leaf in picked if leaf.ndim != 2]
    if not_matrices:
        raise DiverifyError(f"rank-one coordinates need 2-D weight matrices, but pattern {pattern!r} "
                            f"also selects {', '.join(not_matrices[:4])}; narrow it (e.g. '*/kernel')")
    return Perturbation(kind="rank_one", paths=tuple(p for p, _ in picked),
                        shapes=tuple(tuple(leaf.shape) for _, leaf in picked),
                        dtypes=tuple(str(leaf.dtype) for _, leaf in picked))


def sample_coordinates(perturbation: Perturbation, key: jax.Array, sigma: jax.Array) -> tuple[Any, ...]:
    """One draw of ``N(0, sigma^2 I)`` in the perturbation's coordinates, one entry per path.

    A single ``normal`` call per sample (float32, cast to each leaf's dtype)
    and split in ``paths`` order: one PRNG call site keeps the compile time of
    the sampler flat in the number of leaves.
    """
    flat = sigma * jax.random.normal(key, (perturbation.num_coordinates,), jnp.float32)
    coords, offset = [], 0
    for parts_shapes, dtype in zip(perturbation._coordinate_shapes(), perturbation.dtypes):
        parts = []
        for part_shape in parts_shapes:
            size = math.prod(part_shape)
            parts.append(flat[offset:offset + size].reshape(part_shape).astype(jnp.dtype(dtype)))
            offset += size
        coords.append(parts[0] if perturbation.kind == "weights" else tuple(parts))
    return tuple(coords)


def apply_coordinates(perturbation: Perturbation, params: Params, coords: tuple[Any, ...]) -> Params:
    """The parameters moved by ``coords``: ``theta + z`` or ``W + u v^T`` on the selected leaves."""
    index = {p: i for i, p in enumerate(perturbation.paths)}

    def move(key_path, leaf):
        i = index.get(path_string(key_path))
        if i is None:
            return leaf
        if perturbation.kind == "weights":
            rows = perturbation.rows[i] if perturbation.rows else None
            return leaf + coords[i] if rows is None else leaf.at[np.asarray(rows)].add(coords[i])
        u, v = coords[i]
        return leaf + jnp.outer(u, v).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(move, params)


def coordinate_norm(coords: tuple[Any, ...]) -> jax.Array:
    """The l_2 norm of a coordinate vector, the ``||delta||_2`` the certified radius is measured in."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(coords)))


def _count_chunk_impl(predicate: Predicate, perturbation: Perturbation, plan, params: Params,
                      key: jax.Array, sigma: jax.Array, indices: jax.Array, valid: jax.Array) -> jax.Array:
    from diverify.cws.reparam import noisy_call  # reparam builds on this module

    def one(index):
        out = noisy_call(predicate, params, perturbation, jax.random.fold_in(key, index), sigma, plan)
        return jnp.asarray(out, bool)

    hits = jax.vmap(one)(indices)
    return jnp.sum(jnp.logical_and(hits, valid).astype(jnp.int32))


@functools.cache
def _count_chunk():
    """One jit for the process, compiled ahead of time per (predicate, perturbation, plan, shapes,
    shardings) and cached by JAX, so repeated certificates (seeds, sigmas) do not recompile."""
    return xla_options.jit(_count_chunk_impl, static_argnums=(0, 1, 2))


def sample_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("samples",)`` mesh over the given (default: all local) devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), ("samples",))


@dataclasses.dataclass(frozen=True)
class HitCount:
    """``k`` hits among this run's samples, the compile time and the sampling time after it."""

    k: int
    compile_seconds: float
    sample_seconds: float


def count_hits_timed(predicate: Predicate, params: Params, perturbation: Perturbation, *,
                     sigma: float, key: jax.Array, num_samples: int, batch_size: int = 8,
                     mesh: Mesh | None = None, sampler: Literal["explicit", "local"] = "explicit",
                     progress: Callable[[int], None] | None = None) -> HitCount:
    """:func:`count_predicate_hits` with its compile and sampling times measured apart."""
    if num_samples < 1:
        raise DiverifyError(f"--samples {num_samples} must be at least 1")
    if batch_size < 1:
        raise DiverifyError(f"--batch {batch_size} must be at least 1")
    if not sigma > 0:
        raise DiverifyError(f"--sigma {sigma} must be positive")
    if sampler not in ("explicit", "local"):
        raise DiverifyError(f"sampler {sampler!r} must be 'explicit' or 'local'")
    start = time.perf_counter()
    plan = None
    if sampler == "local":
        from diverify.cws.reparam import local_plan

        plan = local_plan(predicate, params, perturbation)
    mesh = sample_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    chunk = -(-batch_size // num_devices) * num_devices
    num_processes, process = jax.process_count(), jax.process_index()
    local = np.arange(process, num_samples, num_processes, dtype=np.uint32)

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("samples"))
    params = jax.device_put(params, replicated)
    key = jax.device_put(key, replicated)
    sigma_arr = jax.device_put(jnp.float32(sigma), replicated)

    def chunk_arrays(part):
        indices = np.zeros(chunk, np.uint32)
        indices[:len(part)] = part
        valid = np.arange(chunk) < len(part)
        return jax.device_put(indices, sharded), jax.device_put(valid, sharded)

    compiled = _count_chunk().lower(predicate, perturbation, plan, params, key, sigma_arr,
                                  *chunk_arrays(local[:chunk])).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    total = 0
    for begin in range(0, len(local), chunk):
        part = local[begin:begin + chunk]
        total += int(compiled(params, key, sigma_arr, *chunk_arrays(part)))
        if progress is not None:
            progress(len(part))
    if num_processes > 1:
        from jax.experimental import multihost_utils
        total = int(np.sum(multihost_utils.process_allgather(np.int64(total))))
    return HitCount(k=total, compile_seconds=compile_seconds, sample_seconds=time.perf_counter() - start)


def count_predicate_hits(predicate: Predicate, params: Params, perturbation: Perturbation, *,
                         sigma: float, key: jax.Array, num_samples: int, batch_size: int = 8,
                         mesh: Mesh | None = None, sampler: Literal["explicit", "local"] = "explicit",
                         progress: Callable[[int], None] | None = None) -> int:
    """Number of the ``num_samples`` noisy models on which ``predicate`` is true.

    Sample ``i`` (``0 <= i < num_samples``) uses the noise drawn from
    ``fold_in(key, i)``; the result depends only on ``(key, num_samples,
    sigma, sampler)``.  ``sampler="explicit"`` draws the coordinates
    ``sigma * N(0, I)`` and evaluates ``predicate(theta + z)``;
    ``sampler="local"`` draws the noise of each perturbed Dense kernel at
    the layer's output (:mod:`diverify.cws.reparam`): the same law of the
    outcome, so the same certificate, with far fewer normals per sample.
    ``batch_size`` samples per chunk (rounded up to a multiple of the mesh
    size) are evaluated with ``vmap`` under ``jit``, sharded over ``mesh``
    (default: all local devices); ``progress(n)`` is called after each chunk
    with the number of samples done in this process.  With several
    ``jax.distributed`` processes, each takes every ``P``-th index and the
    counts are summed over processes.
    """
    return count_hits_timed(predicate, params, perturbation, sigma=sigma, key=key, num_samples=num_samples,
                            batch_size=batch_size, mesh=mesh, sampler=sampler, progress=progress).k
