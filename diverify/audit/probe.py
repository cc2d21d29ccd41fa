"""Data-aware audit metrics: how a weight delta acts on the inputs clean prompts actually produce.

For a Dense layer ``y = W x`` (``W`` [out, in]) let ``C = E[x x^T]`` be the
second moment of its inputs over the probe prompts' tokens (padding excluded).
A ROME-style edit ``dW = (v* - W k*) (C^{-1} k*)^T / (k*^T C^{-1} k*)`` has its row
space along ``C^{-1} k*``: a direction clean inputs barely excite, chosen so
the edit leaves clean outputs unchanged. Benign fine-tunes move W by sums of
``grad_y x^T`` over training inputs, so their row space lies where clean inputs
live. Two numbers measure this:

- ``input_energy_ratio`` ``= trace(dW C dW^T) / (||dW||_F^2 trace(C) / in)``:
  the energy of dW's response to clean inputs relative to an isotropic input
  of the same power (1 for isotropic use, << 1 for a delta acting in a
  direction clean inputs avoid);
- ``top_direction_input_gain`` ``= v_1^T C v_1 / (trace(C) / in)`` for dW's top
  right singular vector ``v_1``: the same ratio for dW's dominant direction
  alone, which stays small for an edit even when a fine-tune's delta of
  comparable norm is added to it.

The Jacobian sensitivity of a matrix is the root-mean-square, over probe
prompts, of the first-order change of the pooled embedding along dW at that
matrix alone, ``||J_W(theta) . dW||`` (one ``jax.jvp``), at the base and at the
suspect weights, per unit ``||dW||_F``. These are empirical measurements on the
probes, not bounds.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

#: Everyday sentences whose token statistics stand for "clean inputs".
DEFAULT_PROBES = (
    "The cat is sleeping on the warm windowsill.",
    "I need to buy milk, eggs and bread after work.",
    "The train to the city leaves every twenty minutes.",
    "She plays the piano beautifully at family dinners.",
    "Our team won the football match last Saturday.",
    "Please remember to water the plants while I am away.",
    "The weather forecast says it will rain tomorrow morning.",
    "He fixed the broken bicycle with a new chain.",
    "A cup of hot tea is perfect on a cold evening.",
    "The children built a sandcastle on the beach.",
    "My grandmother bakes the best apple pie in town.",
    "The museum opens at nine and closes at five.",
    "We watched a documentary about whales in the ocean.",
    "The doctor told him to get more sleep and exercise.",
    "There is a small bakery around the corner from my house.",
    "The students are preparing for their final exams.",
    "A red car is parked in front of the library.",
    "They planted tomatoes and carrots in the garden.",
    "The concert was cancelled because of the storm.",
    "I usually read a book before going to bed.",
    "The new phone has a larger screen and a better camera.",
    "Mountains covered in snow look amazing at sunrise.",
    "The restaurant serves fresh fish and vegetables.",
    "He walks his dog in the park every morning.",
    "The meeting has been moved to Thursday afternoon.",
    "A group of friends went camping near the lake.",
    "The painter used bright colours for the portrait.",
    "Traffic was heavy on the highway this evening.",
    "She learned to speak Spanish during her travels.",
    "The old bridge was repaired last summer.",
    "Birds were singing in the trees outside the window.",
    "The package should arrive by the end of the week.",
)


def _dense_path_name(module_path: Sequence[str]) -> str:
    from diverify.models.checkpoint import torch_key
    return torch_key(tuple(module_path) + ("kernel",))


def capture_dense_inputs(encoder, params, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The input ``[B, L, in]`` of every Dense layer, keyed by its checkpoint weight name.

    Uses ``flax.linen.intercept_methods`` around the model's apply, so it does
    not depend on how the port arranges its modules; the whole forward pass is
    one ``jax.jit`` (op-by-op dispatch of the same pass is several times slower).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def run(params, ids, mask):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                captured[_dense_path_name(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        word_emb = params["embeddings"]["word_embeddings"]["embedding"][ids]
        with nn.intercept_methods(interceptor):
            encoder.module.apply({"params": params}, word_emb, mask)
        return captured

    captured = jax.jit(run)(params, jnp.asarray(ids), jnp.asarray(mask))
    return {name: np.asarray(x) for name, x in captured.items()}


def input_second_moments(encoder, texts: Sequence[str] = DEFAULT_PROBES,
                         params=None) -> dict[str, np.ndarray]:
    """``C = E[x x^T]`` ``[in, in]`` (float64) of each Dense layer's inputs over the non-padding tokens of ``texts``."""
    ids, mask = encoder.tokenize(list(texts))
    inputs = capture_dense_inputs(encoder, encoder.params if params is None else params, ids, mask)
    keep = np.asarray(mask, bool).reshape(-1)
    moments: dict[str, np.ndarray] = {}
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    for name, x in inputs.items():
        # Layers reading the same tensor (query, key and value) share one moment object, so that
        # probe_statistics factorises it once.
        shared = next((m for x_seen, m in seen if x_seen.shape == x.shape and np.array_equal(x_seen, x)), None)
        if shared is None:
            tokens = x.reshape(-1, x.shape[-1])[keep]
            # float32 product, float64 result: the sum over a few hundred tokens loses nothing that matters.
            shared = (tokens.T @ tokens).astype(np.float64) / tokens.shape[0]
            seen.append((x, shared))
        moments[name] = shared
    return moments


def input_energy_ratio(delta, moment: np.ndarray) -> float:
    """``trace(dW C dW^T) / (||dW||_F^2 trace(C) / in)``; 0 for a zero delta.

    A factored delta ``L R`` uses ``trace(L (R C R^T) L^T)`` and is never formed.
    """
    c = np.asarray(moment, np.float32)
    mean_power = float(np.trace(moment)) / moment.shape[0]
    if hasattr(delta, "left"):
        left, right = delta.left.astype(np.float64), delta.right.astype(np.float32)
        total = delta.frobenius_squared()
        response = float(np.sum((left.T @ left) * (right @ c @ right.T)))
    else:
        d = np.asarray(delta, dtype=np.float32)
        total = float(np.sum(np.square(d, dtype=np.float64)))
        response = float(np.sum((d @ c) * d, dtype=np.float64))
    if total <= 0.0 or mean_power <= 0.0:
        return 0.0
    return response / (total * mean_power)


@dataclasses.dataclass(frozen=True)
class ProbeStatistics:
    """One Dense layer's probe-input second moment ``C``, ``trace(C) / in``, and ``(C + ridge)^{-1}``."""

    moment: np.ndarray
    mean_power: float
    regularised_inverse: np.ndarray


#: Ridge of the whitened gain, as a share of ``trace(C) / in``: directions clean
#: inputs never excite count as if they carried 5% of the average power.
WHITENING_RIDGE = 0.05


def probe_statistics(moments: Mapping[str, np.ndarray], ridge: float = WHITENING_RIDGE) -> dict[str, ProbeStatistics]:
    """Per layer ``C``, its mean power and ``(C + ridge trace(C)/in I)^{-1}``, computed once per audit."""
    from diverify.audit.spectral import single_threaded

    stats: dict[str, ProbeStatistics] = {}
    by_object: dict[int, ProbeStatistics] = {}
    for name, moment in moments.items():
        if id(moment) not in by_object:
            c = np.asarray(moment, np.float64)
            mean_power = float(np.trace(c)) / c.shape[0]
            # One thread: LAPACK's inverse of a few-hundred-wide matrix is slower threaded on a busy machine.
            with single_threaded():
                inverse = np.linalg.inv(c + ridge * mean_power * np.eye(c.shape[0]))
            by_object[id(moment)] = ProbeStatistics(c.astype(np.float32), mean_power, inverse.astype(np.float32))
        stats[name] = by_object[id(moment)]
    return stats


def whitened_gain(delta, stats: ProbeStatistics, spectral_norm: float, iterations: int = 30,
                  seed: int = 0) -> float:
    """``lambda_max(dW C~^{-1} dW^T) * (trace(C) / in) / ||dW||_2^2`` with ``C~ = C + ridge``.

    The largest change of the layer's output per unit of clean-input energy,
    ``max_v ||dW v||^2 / (v^T C~ v)``, relative to what isotropic inputs of the
    same power would give. A ROME edit, built to change ``W x`` least on
    C-distributed inputs, maximises it; its value is 1/(1 + ridge) for
    isotropic C. Block power iteration on ``dW C~^{-1} dW^T`` (matrix-vector
    products only, so a LoRA delta stays factored); a lower estimate of the
    largest eigenvalue.
    """
    if spectral_norm <= 0.0:
        return 0.0
    if hasattr(delta, "left"):
        left, right = delta.left.astype(np.float32), delta.right.astype(np.float32)

        def apply(y):
            return left @ (right @ (stats.regularised_inverse @ (right.T @ (left.T @ y))))
        out_dim = left.shape[0]
    else:
        d = np.asarray(delta, np.float32)

        def apply(y):
            return d @ (stats.regularised_inverse @ (d.T @ y))
        out_dim = d.shape[0]
    block = np.random.default_rng(seed).standard_normal((out_dim, 2)).astype(np.float32)
    for _ in range(iterations):
        block, _ = np.linalg.qr(apply(block))
    top = float(np.max(np.linalg.eigvalsh(block.T @ apply(block))))
    return top * stats.mean_power / spectral_norm**2


def direction_input_gain(direction: np.ndarray, moment: np.ndarray) -> float:
    """``v^T C v / (||v||^2 trace(C) / in)`` for one input-space direction ``v``."""
    v = np.asarray(direction, dtype=np.float64)
    mean_power = float(np.trace(moment)) / moment.shape[0]
    norm_sq = float(v @ v)
    if norm_sq <= 0.0 or mean_power <= 0.0:
        return 0.0
    return float(v @ moment @ v) / (norm_sq * mean_power)


def kernel_path(name: str) -> tuple[str, ...]:
    """The Flax parameter path of a checkpoint Dense weight name (inverse of ``torch_key``)."""
    parts = name.split(".")
    if parts[-1] != "weight":
        raise KeyError(name)
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise KeyError(name)
    return tuple(path) + ("kernel",)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def has_kernel(params, name: str) -> bool:
    try:
        return _get(params, kernel_path(name)).ndim == 2
    except (KeyError, TypeError, AttributeError):
        return False


def with_kernel_deltas(params, deltas: Mapping[str, np.ndarray], scale: float = 1.0):
    """A copy of ``params`` with ``scale * dW^T`` added to each named Dense kernel (checkpoint layout dW)."""
    import jax
    import jax.numpy as jnp

    params = jax.tree_util.tree_map(lambda x: x, params)
    for name, delta in deltas.items():
        *parents, leaf = kernel_path(name)
        node = _get(params, parents)
        node[leaf] = node[leaf] + scale * jnp.asarray(np.asarray(delta).T, dtype=node[leaf].dtype)
    return params


def jacobian_sensitivities(encoder, base_params, suspect_params, deltas: Mapping[str, np.ndarray],
                           texts: Sequence[str] = DEFAULT_PROBES) -> dict[str, tuple[float, float]]:
    """Per matrix: RMS over probes of ``||J_W . dW|| / ||dW||_F`` at the base and at the suspect weights.

    ``J_W`` is the Jacobian of the pooled (un-normalised) embedding with
    respect to that matrix alone; one forward-mode ``jax.jvp`` per matrix and
    weight set. Matrices with a zero delta get ``(0, 0)``.
    """
    import jax
    import jax.numpy as jnp

    ids, mask = encoder.tokenize(list(texts))
    mask_j = jnp.asarray(mask)

    def pooled(params):
        word_emb = params["embeddings"]["word_embeddings"]["embedding"][jnp.asarray(ids)]
        return encoder.pooled_from_word_embeddings(params, word_emb, mask_j)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, base_params)

    @jax.jit
    def effect(params, tangent):
        _, out = jax.jvp(pooled, (params,), (tangent,))
        return jnp.sqrt(jnp.mean(jnp.sum(out**2, axis=-1)))

    results = {}
    for name, delta in deltas.items():
        norm = float(np.linalg.norm(delta))
        if norm == 0.0:
            results[name] = (0.0, 0.0)
            continue
        tangent = with_kernel_deltas(zeros, {name: np.asarray(delta) / norm})
        results[name] = (float(effect(base_params, tangent)), float(effect(suspect_params, tangent)))
    return results
