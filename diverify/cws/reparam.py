"""Local reparameterisation: sample the noise of a Dense layer's *output* instead of its kernel.

For a Dense layer ``y = x (W + sigma E) + b`` with ``E`` an ``[in, out]``
matrix of i.i.d. ``N(0, 1)`` entries and the layer's inputs stacked as the
rows of ``X`` (``N x in``, every batch element and position the call sees),
the noise term ``X E`` has independent columns ``X e_j ~ N(0, X X^T)``.  With
the eigendecomposition of the ``N x N`` Gram matrix ``X X^T = V Lambda V^T``,
``V Lambda^{1/2} g ~ N(0, X X^T)`` for ``g ~ N(0, I_N)``, so

    X E  =_d  V Lambda^{1/2} G,      G ~ N(0, 1)^{N x out}.

Drawing ``G`` costs ``N * out`` normals instead of ``in * out`` (MiniLM, one
prompt of 7 tokens: 145k instead of 10.6M per sample), and the clean kernel
stays shared by every sample in a batch.  When ``N >= in`` the layer draws
``E`` itself (``X E`` directly), which is no more expensive.  (``eigh`` of
the Gram matrix rather than a Cholesky or QR factor: it exists for a
rank-deficient ``X``, e.g. repeated rows, and is the fastest of the three on
CPU; eigenvalues below zero from float32 rounding are clamped to zero.)

Exact in distribution for the whole network, not only one layer, provided
each perturbed kernel is applied in exactly one Dense call and read nowhere
else: then ``E`` enters the computation only through ``X E``; ``X`` is a
function of the inputs and of noise drawn before (in other layers), which is
independent of ``E``, so conditionally on everything before the call ``X E``
and ``V Lambda^{1/2} G`` have the same law, and by induction over the calls the joint
law of all outputs, hence the predicate's outcome, is the same as with
explicit noise ``theta + sigma eps``.  The Monte-Carlo certificate is
therefore the same statistical statement (``n`` i.i.d. Bernoulli(p) draws of
the same smoothed predicate); only the realisation from a given seed differs.

:func:`local_plan` checks that condition by tracing: a perturbed kernel
whose Dense module is called more than once (e.g. the target embedding
recomputed with the same noisy weights), or whose leaf is read outside a
Dense call, gets explicit noise; a perturbed leaf the function never reads
gets no noise at all (its noise cannot change the outcome).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverify.cws.sampling import Params, Perturbation, apply_coordinates, path_string, sample_coordinates
from diverify.errors import DiverifyError


@dataclasses.dataclass(frozen=True)
class LocalPlan:
    """How each perturbed leaf gets its noise: at a layer's output, explicitly, or not at all.

    ``local``: Dense kernels (noise ``sigma X E`` at the call's output) and
    row-restricted Embed tables (noise ``sigma Z[ids]`` on the looked-up
    rows, one ``Z`` per sample shared by every lookup); ``explicit``: the
    perturbation restricted to the leaves read otherwise (``theta + z`` as in
    :mod:`diverify.cws.sampling`); ``unread``: perturbed leaves the function
    never reads.  Hashable (a static argument of ``jit``).
    """

    local: tuple[str, ...]
    explicit: Perturbation
    unread: tuple[str, ...]
    rows: tuple[tuple[int, ...] | None, ...]


_LAYERS = ((nn.Dense, "kernel"), (nn.Embed, "embedding"))


@contextlib.contextmanager
def _layer_calls(params: Params, paths: frozenset[str], on_call: Callable[..., Any]):
    """Route every ``nn.Dense`` / ``nn.Embed`` call whose weight *is* a leaf of ``params`` at ``paths`` to ``on_call``.

    The weight is identified by object identity with the leaf handed to the
    function, not by module name, so a model applied to a sub-tree or under
    another root is matched correctly (or not at all: then it runs as usual).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    by_id = {id(leaf): path_string(kp) for kp, leaf in leaves}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        for cls, name in _LAYERS:
            # Exactly the stock layer (a subclass or a custom dot_general may compute something else than x W).
            if (type(module) is cls and context.method_name == "__call__" and module.has_variable("params", name)
                    and getattr(module, "dot_general", None) is None
                    and getattr(module, "dot_general_cls", None) is None):
                path = by_id.get(id(module.get_variable("params", name)))
                if path in paths:
                    return on_call(path, module, next_fun, args, kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _zero_output(module, args):
    """The call's output shape, zeros, still reading the input and a Dense bias (only the weight's reads vanish)."""
    x = args[0]
    if isinstance(module, nn.Embed):
        return jnp.zeros(x.shape + (module.features,), module.param_dtype)
    out = jnp.zeros(x.shape[:-1] + (module.features,), jnp.result_type(x, module.param_dtype))
    out = out + 0 * jnp.sum(x, axis=-1, keepdims=True)
    return out + module.get_variable("params", "bias") if module.use_bias else out


def local_plan(fn: Callable[[Params], Any], params: Params, perturbation: Perturbation) -> LocalPlan:
    """Trace ``fn(params)`` once and decide which perturbed weights take local noise (module docstring).

    Candidates are 2-D leaves without a row restriction (Dense kernels) and
    row-restricted leaves (Embed tables).  A kernel is local when its Dense
    module is called exactly once, a table when it is looked up only through
    Embed calls; in both cases checked by replacing those calls' outputs by
    zeros: the traced program must then no longer read the leaf at all.
    Weight-space perturbations only.
    """
    if perturbation.kind != "weights":
        raise DiverifyError("local reparameterisation applies to weight-space noise, not rank-one coordinates")
    rows = perturbation.rows or (None,) * len(perturbation.paths)
    candidates = frozenset(p for p, shape, r in zip(perturbation.paths, perturbation.shapes, rows)
                           if r is not None or len(shape) == 2)
    calls: dict[str, list[str]] = {}

    def zero_output(path, module, next_fun, args, kwargs):
        calls.setdefault(path, []).append(type(module).__name__)
        return _zero_output(module, args)

    def traced(p):
        with _layer_calls(p, candidates, zero_output):
            return fn(p)

    jaxpr = jax.make_jaxpr(traced)(params).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    read = {path_string(kp) for (kp, _), var in zip(leaves, jaxpr.invars) if id(var) in used}

    def is_local(path, row):
        seen = calls.get(path, [])
        if path in read or not seen:
            return False
        return seen == ["Dense"] and row is None or set(seen) == {"Embed"} and row is not None

    local = tuple(p for p, r in zip(perturbation.paths, rows) if is_local(p, r))
    unread = tuple(p for p in perturbation.paths if p not in read and p not in calls)
    keep = [i for i, p in enumerate(perturbation.paths) if p not in local and p not in unread]
    explicit = dataclasses.replace(
        perturbation, paths=tuple(perturbation.paths[i] for i in keep),
        shapes=tuple(perturbation.shapes[i] for i in keep), dtypes=tuple(perturbation.dtypes[i] for i in keep),
        rows=tuple(rows[i] for i in keep) if perturbation.rows else ())
    by_path = dict(zip(perturbation.paths, rows))
    return LocalPlan(local=local, explicit=explicit, unread=unread, rows=tuple(by_path[p] for p in local))


def dense_output_noise(x: jax.Array, features: int, key: jax.Array) -> jax.Array:
    """A draw of ``x E`` for ``E ~ N(0, 1)^{in x features}``: ``V Lambda^{1/2} G`` when fewer rows than ``in``."""
    rows, fan_in = math.prod(x.shape[:-1]), x.shape[-1]
    flat = x.reshape(rows, fan_in).astype(jnp.float32)
    if rows < fan_in:
        lam, vec = jnp.linalg.eigh(flat @ flat.T)
        noise = (vec * jnp.sqrt(jnp.maximum(lam, 0.0))) @ jax.random.normal(key, (rows, features), jnp.float32)
    else:
        noise = flat @ jax.random.normal(key, (fan_in, features), jnp.float32)
    return noise.reshape(x.shape[:-1] + (features,))


def embed_lookup_noise(ids: jax.Array, rows: tuple[int, ...], num_embeddings: int, features: int,
                       key: jax.Array) -> jax.Array:
    """``Z[ids]`` for a table noise ``Z``, ``N(0, 1)`` on ``rows`` and zero elsewhere (drawn on ``rows`` only)."""
    slot = np.full(num_embeddings, len(rows), np.int32)
    slot[np.asarray(rows)] = np.arange(len(rows), dtype=np.int32)
    z = jax.random.normal(key, (len(rows), features), jnp.float32)
    return jnp.concatenate([z, jnp.zeros((1, features), jnp.float32)])[jnp.asarray(slot)[ids]]


def noisy_call(fn: Callable[[Params], Any], params: Params, perturbation: Perturbation, key: jax.Array,
               sigma: jax.Array, plan: LocalPlan | None = None) -> Any:
    """``fn`` on one draw of the ``sigma``-noisy parameters: explicit noise, or local noise per ``plan``.

    Without a plan, ``fn(theta + z)`` with ``z`` from
    :func:`~diverify.cws.sampling.sample_coordinates` and ``key``.  With a
    plan, the plan's explicit leaves get ``z`` from ``fold_in(key, 0)`` and
    local weight ``j``'s noise (``X E`` of a Dense call, ``Z`` of a table)
    is drawn from ``fold_in(fold_in(key, 1), j)``: the same law of ``fn``'s output.
    """
    if plan is None:
        return fn(apply_coordinates(perturbation, params, sample_coordinates(perturbation, key, sigma)))
    explicit = sample_coordinates(plan.explicit, jax.random.fold_in(key, 0), sigma)
    moved = apply_coordinates(plan.explicit, params, explicit)
    local_key = jax.random.fold_in(key, 1)
    index = {p: j for j, p in enumerate(plan.local)}

    def add_noise(path, module, next_fun, args, kwargs):
        y = next_fun(*args, **kwargs)
        j = index[path]
        if isinstance(module, nn.Embed):
            noise = embed_lookup_noise(args[0], plan.rows[j], module.num_embeddings, module.features,
                                       jax.random.fold_in(local_key, j))
        else:
            noise = dense_output_noise(args[0], module.features, jax.random.fold_in(local_key, j))
        return y + (sigma * noise).astype(y.dtype)

    with _layer_calls(moved, frozenset(plan.local), add_noise):
        return fn(moved)
