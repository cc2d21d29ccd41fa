"""Data-aware audit metrics: how a weight delta acts on the inputs clean prompts actually produce.

For a Dense layer ``y = W x`` (``W`` [out, in]) let ``C = E[x x^T]`` be the
second moment of its inputs over the probe prompts' tokens (padding excluded).
A ROME-style edit ``dW = (v* - W k*) (C^{-1} k*)^T / (k*^T C^{-1} k*)`` has its row
space along ``C^{-1} k*``: a direction clean inputs barely excite, chosen so
the edit leaves clean outputs unchanged. Benign fine-tunes move W by sums of
``grad_y x^T`` over training inputs, so their row space lies where clean inputs
live, and a merged LoRA's row space is its random factor A. Three numbers measure this:

- ``input_energy_ratio`` ``= trace(dW C dW^T) / (||dW||_F^2 trace(C) / in)``:
  the energy of dW's response to clean inputs relative to an isotropic input
  of the same power (1 for isotropic use, << 1 for a delta acting in a
  direction clean inputs avoid);
- ``top_direction_input_gain`` ``= v_1^T C v_1 / (trace(C) / in)`` for dW's top
  right singular vector ``v_1``;
- :func:`row_space_gains` ``g_1 >= g_2 >= ...``: the largest change of the
  layer's output per unit of clean-input energy, relative to isotropic inputs,
  within the span of dW's top right singular vectors (what the audit's
  suspicion is built from, see :mod:`diverify.audit.report`).

The Jacobian sensitivity of a matrix is the root-mean-square, over probe
prompts, of the first-order change of the pooled embedding along dW at that
matrix alone, ``||J_W(theta) . dW||`` (one ``jax.jvp``), at the base and at the
suspect weights, per unit ``||dW||_F``. These are empirical measurements on the
probes, not bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

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


@functools.lru_cache(maxsize=4)
def _fast_tokenizer(path: str, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    padding = tokenizer.padding
    if padding is None:
        return None
    tokenizer.enable_padding(pad_id=padding["pad_id"], pad_token=padding["pad_token"],
                             pad_type_id=padding["pad_type_id"], direction=padding["direction"])
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def tokenize(encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``encoder.tokenize(texts)``, read with the ``tokenizers`` library alone when the model has a ``tokenizer.json``.

    Building the same tokenizer through ``transformers`` imports it and torch
    (seconds); ``tokenizer.json`` holds the whole pipeline (normaliser,
    WordPiece/BPE, special tokens, padding token). Falls back to
    ``encoder.tokenize`` when the file is absent or sets no padding token.
    """
    path = Path(encoder.directory or "") / "tokenizer.json"
    if not encoder.directory or not path.is_file() or not texts or not all(isinstance(t, str) for t in texts):
        return encoder.tokenize(texts)
    max_length = encoder.max_seq_length or encoder.config.max_position_embeddings
    tokenizer = _fast_tokenizer(str(path), int(max_length))
    if tokenizer is None:
        return encoder.tokenize(texts)
    out = tokenizer.encode_batch(list(texts))
    return (np.asarray([e.ids for e in out], np.int32), np.asarray([e.attention_mask for e in out], np.int32))


@functools.lru_cache(maxsize=4)
def _capture_program(encoder):
    """The jitted forward pass returning every Dense input (one per encoder, so shapes seen once compile once)."""
    import flax.linen as nn
    import jax

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

    return jax.jit(run)


def capture_dense_inputs(encoder, params, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The input ``[B, L, in]`` of every Dense layer, keyed by its checkpoint weight name.

    Uses ``flax.linen.intercept_methods`` around the model's apply, so it does
    not depend on how the port arranges its modules; the whole forward pass is
    one ``jax.jit`` (op-by-op dispatch of the same pass is several times slower).
    """
    import jax.numpy as jnp

    captured = _capture_program(encoder)(params, jnp.asarray(ids), jnp.asarray(mask))
    return {name: np.asarray(x) for name, x in captured.items()}


def input_second_moments(encoder, texts: Sequence[str] = DEFAULT_PROBES,
                         params=None) -> dict[str, np.ndarray]:
    """``C = E[x x^T]`` ``[in, in]`` (float64) of each Dense layer's inputs over the non-padding tokens of ``texts``."""
    ids, mask = tokenize(encoder, list(texts))
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
    """One Dense layer's probe-input second moment ``C`` (float32) and its mean power ``trace(C) / in``."""

    moment: np.ndarray
    mean_power: float


#: Ridge of the row-space gains, as a share of ``trace(C) / in``: directions clean
#: inputs never excite count as if they carried 5% of the average power.
WHITENING_RIDGE = 0.05
#: How many of dW's top right singular vectors span the subspace the row-space gains search.
ROW_SPACE_DIRECTIONS = 4
#: Singular values below this share of ``s_1`` are numerically zero (dropped from the subspace).
RANK_TOLERANCE = 1e-6


def probe_statistics(moments: Mapping[str, np.ndarray]) -> dict[str, ProbeStatistics]:
    """Per layer ``C`` as float32 and ``trace(C) / in``; layers sharing one moment object share the result."""
    stats: dict[str, ProbeStatistics] = {}
    by_object: dict[int, ProbeStatistics] = {}
    for name, moment in moments.items():
        if id(moment) not in by_object:
            c = np.asarray(moment)
            by_object[id(moment)] = ProbeStatistics(c.astype(np.float32), float(np.trace(c)) / c.shape[0])
        stats[name] = by_object[id(moment)]
    return stats


def row_space_gains(singular_values: np.ndarray, right_vectors: np.ndarray, stats: ProbeStatistics,
                    ridge: float = WHITENING_RIDGE) -> np.ndarray:
    """Clean-input gains ``g_1 >= g_2 >= ...`` of dW inside the span of its top right singular vectors.

    With ``V`` [m, in] the top-m right singular vectors of dW (orthonormal
    rows), ``S`` their singular values and ``C~ = C + ridge (trace(C)/in) I``,
    every input ``x = V^T c`` of that span has ``||dW x||^2 = c^T S^2 c``
    exactly, and ``g_i`` are the generalised eigenvalues of
    ``(S^2, V C~ V^T)`` times ``(trace(C)/in) / s_1^2``: ``g_1`` is the largest
    ``||dW x||^2 / (x^T C~ x)`` over the span relative to isotropic inputs of
    the same power and to dW's own spectral norm, ``g_2`` the largest on the
    complement (in the ``C~`` inner product) of ``g_1``'s direction, and so on.

    A ROME edit's row direction ``C^{-1} k*`` is one that clean inputs barely
    excite, so its ``g`` is large; benign fine-tune directions (sums of
    ``grad_y x^T`` over clean inputs) have ``g << 1``; a LoRA factor's random
    directions have ``g`` near 1. Directions with ``s_i <= RANK_TOLERANCE s_1``
    are dropped, so a rank-one delta returns one gain.
    """
    s = np.asarray(singular_values, np.float64)[:ROW_SPACE_DIRECTIONS]
    if s.size == 0 or s[0] <= 0.0:
        return np.zeros(0)
    keep = s > RANK_TOLERANCE * s[0]
    s = s[keep]
    v = np.asarray(right_vectors, np.float32)[:ROW_SPACE_DIRECTIONS][keep]
    moment = np.asarray(stats.moment, np.float32)
    b = (v @ moment @ v.T).astype(np.float64) + ridge * stats.mean_power * (v.astype(np.float64) @ v.T.astype(np.float64))
    # Generalised symmetric eigenproblem via Cholesky: eig(L^{-1} S^2 L^{-T}) with B = L L^T.
    inv_l = np.linalg.inv(np.linalg.cholesky(b))
    core = (inv_l * s**2) @ inv_l.T
    gains = np.linalg.eigvalsh((core + core.T) / 2)[::-1]
    return np.maximum(gains, 0.0) * stats.mean_power / s[0] ** 2


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

    ids, mask = tokenize(encoder, list(texts))
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
