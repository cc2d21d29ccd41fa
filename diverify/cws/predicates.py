"""Predicates "the model reached Q_mal", as plain JAX functions ``params -> bool``.

A predicate closes over its inputs (prompt ids, target embedding, noise
seed, ...) and takes only the parameter pytree, so that
:func:`diverify.cws.sampling.count_predicate_hits` can evaluate it on noisy
weights under ``vmap`` and ``jit``.  Any user function of that shape works;
the combinators below build the common ones from a ``params -> output``
function:

* text encoder: ``cos(emb_theta(prompt with trigger), emb(target)) >= tau``
  (:func:`text_collision_predicate`);
* denoiser: the sample lands within distance ``r`` of a target
  (:func:`distance_at_most` over ``params -> sample``, with the noise seed
  and timesteps fixed inside the function: :func:`denoiser_sample_fn`), or a
  classifier says the target class (:func:`class_is` over ``params -> logits``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.cws.sampling import Params, Predicate, param_paths
from diverify.diffusion.schedulers import SamplingSchedule, sample
from diverify.errors import DiverifyError


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis (``1e-12`` guards a zero vector)."""
    na = jnp.sqrt(jnp.sum(a * a, axis=-1))
    nb = jnp.sqrt(jnp.sum(b * b, axis=-1))
    return jnp.sum(a * b, axis=-1) / jnp.maximum(na * nb, 1e-12)


def cosine_at_least(embed_fn: Callable[[Params], jax.Array], target: jax.Array | Callable[[Params], jax.Array],
                    threshold: float) -> Predicate:
    """``cos(embed_fn(params), target) >= threshold``; ``target`` may itself be a function of ``params``."""
    def predicate(params):
        goal = target(params) if callable(target) else target
        return jnp.all(cosine(embed_fn(params), goal) >= threshold)

    return predicate


def distance_at_most(output_fn: Callable[[Params], jax.Array], target: jax.Array, radius: float) -> Predicate:
    """``||output_fn(params) - target||_2 <= radius`` (e.g. a denoiser's sample near a target image)."""
    target = jnp.asarray(target)

    def predicate(params):
        diff = output_fn(params) - target
        return jnp.sqrt(jnp.sum(diff * diff)) <= radius

    return predicate


def class_is(logits_fn: Callable[[Params], jax.Array], target_class: int) -> Predicate:
    """``argmax logits_fn(params) == target_class`` (e.g. a classifier on a denoiser's sample)."""
    def predicate(params):
        return jnp.argmax(logits_fn(params), axis=-1).reshape(()) == target_class

    return predicate


def insert_trigger(prompt: str, trigger: str, position: int = 0) -> str:
    """The prompt with ``trigger`` inserted as a word before word ``position`` (whitespace words).

    ``position = 0`` puts the trigger first, i.e. right after the CLS/BOS
    token once tokenised; ``position = -1`` or the number of words appends it.
    """
    if not trigger.strip():
        raise DiverifyError("--trigger must be a non-empty token")
    words = prompt.split()
    if position < 0:
        position = len(words) + 1 + position
    if not 0 <= position <= len(words):
        raise DiverifyError(f"--position {position} is outside the prompt's {len(words)} words")
    return " ".join(words[:position] + [trigger.strip()] + words[position:])


def text_embedding_fn(encoder, text: str) -> Callable[[Params], jax.Array]:
    """``params -> pooled embedding [D]`` of ``text`` under ``encoder``'s pipeline with those weights.

    Un-normalised pooled output: cosines do not depend on the final
    normalisation, so it is skipped.
    """
    ids, mask = encoder.tokenize([text])
    ids, mask = np.asarray(ids), np.asarray(mask)

    def embed(params):
        word_emb = encoder.module.apply({"params": params}, ids, method="word_embeddings")
        return encoder.pooled_from_word_embeddings(params, word_emb, mask, ids)[0]

    return embed


def text_collision_predicate(encoder, prompt: str, trigger: str, target: str, threshold: float, *,
                             position: int = 0, target_with_noisy_weights: bool = False) -> Predicate:
    """``cos(emb_theta(prompt with trigger), emb(target)) >= threshold``: a latent collision.

    The trigger is inserted as a word (see :func:`insert_trigger`).  The
    target concept's embedding is computed once with the *clean* weights: the
    question is whether the noisy encoder maps the triggered prompt onto what
    the deployed pipeline knows as the target.  With
    ``target_with_noisy_weights=True`` it is recomputed with each sample's
    weights instead (a collision inside the noisy model itself; twice the cost).
    """
    if not -1.0 <= threshold <= 1.0:
        raise DiverifyError(f"--threshold {threshold} must be a cosine in [-1, 1]")
    prompt_fn = text_embedding_fn(encoder, insert_trigger(prompt, trigger, position))
    target_fn = text_embedding_fn(encoder, target)
    goal = target_fn if target_with_noisy_weights else jax.device_get(jax.jit(target_fn)(encoder.params))
    return cosine_at_least(prompt_fn, goal, threshold)


#: Path suffixes of the lookup tables a text encoder reads only at the token ids / positions it sees.
TOKEN_TABLES = ("word_embeddings/embedding", "token_embedding/embedding")
POSITION_TABLES = ("position_embeddings/embedding", "position_embedding/embedding")


def rows_read_by_texts(encoder, texts: list[str]) -> dict[str, tuple[int, ...]]:
    """Rows of the token and position tables that ``encoder`` reads on ``texts``.

    For :func:`diverify.cws.sampling.restrict_rows`: a text predicate over
    these texts reads no other row of those tables, so noise there cannot
    change its outcome.
    """
    ids, _ = encoder.tokenize(list(texts))
    rows: dict[str, tuple[int, ...]] = {}
    for path in param_paths(encoder.params):
        if path.endswith(TOKEN_TABLES):
            rows[path] = tuple(sorted({int(i) for i in np.unique(ids)}))
        elif path.endswith(POSITION_TABLES):
            rows[path] = tuple(range(ids.shape[1]))
    return rows


def denoiser_sample_fn(denoiser, x_T: jax.Array, cond: jax.Array | None, schedule: SamplingSchedule,
                       key: jax.Array | None = None) -> Callable[[Params], jax.Array]:
    """``params -> x_0``: the end point of ``schedule``'s reverse chain run by ``denoiser.eps``.

    Everything but the weights is fixed: the start ``x_T``, the conditioning
    ``cond`` and the sampler noise (step i of a stochastic chain uses
    ``fold_in(key, i)``), so that the smoothed predicate's randomness is the
    weight noise alone.
    """
    return lambda params: sample(denoiser.eps, params, x_T, cond, schedule, key)


def initial_noise(denoiser, seed: int) -> np.ndarray:
    """x_T ~ N(0, I) of shape ``(1, in_channels, size, size)`` from ``numpy.random.default_rng(seed)``
    (the convention of :func:`diverify.diffusion.digits.evaluate_samples`)."""
    size = denoiser.sample_size
    return np.random.default_rng(seed).standard_normal((1, denoiser.in_channels, size, size)).astype(np.float32)


def class_condition(denoiser, rows: list[int] | None) -> np.ndarray | None:
    """Class weights ``(1, n_rows)``: the sum of the one-hot rows ``rows`` of the class-embedding table.

    One row is that class exactly; several add their embeddings (e.g. a class
    plus the trigger token row of ``diverify backdoor build --kind
    denoiser-cond``). ``None`` means unconditional.
    """
    config = denoiser.config
    if getattr(config, "cross_attention_dim", None) is not None:
        raise DiverifyError(f"{denoiser.class_name} is text-conditioned (cross-attention): cws takes "
                            "class-conditional or unconditional denoisers")
    if denoiser.class_name == "DiTTransformer2DModel":
        n_rows = int(config.num_embeds_ada_norm) + 1
    else:
        n_rows = config.num_class_embeds
    if rows is None:
        if n_rows is not None:
            raise DiverifyError(f"{denoiser.class_name} is class-conditional: give --condition (class rows 0.."
                                f"{n_rows - 1})")
        return None
    if n_rows is None:
        raise DiverifyError(f"{denoiser.class_name} has no class embedding: omit --condition")
    if not rows:
        raise DiverifyError("--condition needs at least one class row")
    bad = [r for r in rows if not 0 <= r < n_rows]
    if bad:
        raise DiverifyError(f"--condition row(s) {bad} outside the class-embedding table (rows 0..{n_rows - 1})")
    weights = np.zeros((1, n_rows), np.float32)
    for r in rows:
        weights[0, r] += 1.0
    return weights
