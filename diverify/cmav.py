"""CMAV — cross-modal alignment verification: latent-collision certificates for text encoders.

A text-encoder backdoor makes ``emb(prompt + trigger) ~ emb(forbidden concept)``
(a *latent collision*). For a prompt and a perturbation set ``S`` of its word
embeddings (an l_p ball at chosen positions, or the convex hull of
substitute words), CMAV proves, for each restricted concept ``c`` with unit
embedding ``t_c``::

    max_{x in S} cos(emb(x), t_c) <= U_c < tau

by bounding the whole map ``x -> <emb(x) / ||emb(x)||, t_c>`` (pooling and
normalisation included) with the bound engine. ``U_c`` is sound; the verdict
is *certified* when ``U_c < tau``. Otherwise an attack (PGD on the ball,
exhaustive or greedy search over substitutions) looks for a witness ``x``
with ``cos >= tau``: a *collision*. If neither succeeds the answer is
*unknown*, with its reason. A bound the engine cannot compute on a valid set
(an interval leaving a function's domain, e.g. a LayerNorm variance bound
reaching 0, or a non-finite bound: the set is too large for the method) is
not an error: every concept is then *unknown* (or a *collision* if the
attack, which still runs, finds one), never certified. The true robust
radius lies between :func:`certified_radius`'s two numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds import compile_bounds
from diverify.bounds.api import INTERMEDIATE
from diverify.errors import DiverifyError, UnsupportedPrimitiveError
from diverify.specs import LpBall, Substitution, lp_ball, substitution

Status = str  # "certified" | "collision" | "unknown"

#: The ``exhaustive`` method (and the substitution attack) enumerate at most this many combinations.
MAX_EXHAUSTIVE = 4096
#: ``exhaustive`` certifies a concept only when every evaluated cosine stays this far below the
#: threshold (float32 evaluations of one input in batches of different sizes differ by ~1e-7).
EXHAUSTIVE_MARGIN = 1e-5


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A tokenised prompt: one sequence of ids and its attention mask."""

    text: str | None
    ids: np.ndarray
    mask: np.ndarray
    tokens: tuple[str, ...]


def make_prompt(encoder, text: str | None = None, ids: Sequence[int] | None = None) -> Prompt:
    """Tokenise ``text`` (or take the ids as given) into a single-sequence :class:`Prompt`."""
    if (text is None) == (ids is None):
        raise DiverifyError("give exactly one of a prompt text or a list of token ids")
    if text is not None:
        tok_ids, mask = encoder.tokenize([text])
        tok_ids, mask = np.asarray(tok_ids)[:1], np.asarray(mask)[:1]
    else:
        tok_ids = np.asarray([list(ids)], dtype=np.int32)
        vocab = _vocab_size(encoder)
        if tok_ids.size == 0:
            raise DiverifyError("the list of token ids is empty")
        if np.any(tok_ids < 0) or np.any(tok_ids >= vocab):
            raise DiverifyError(f"token ids must lie in [0, {vocab}) for this model")
        mask = np.ones_like(tok_ids)
    return Prompt(text=text, ids=tok_ids, mask=mask, tokens=tuple(_token_strings(encoder, tok_ids[0])))


def _vocab_size(encoder) -> int:
    return int(encoder.config.vocab_size)


def _tokenizer(encoder):
    from diverify.models.encoder import _tokenizer

    return _tokenizer(encoder.directory) if encoder.has_tokenizer else None


def _token_strings(encoder, ids) -> list[str]:
    tok = _tokenizer(encoder)
    if tok is not None:
        return list(tok.convert_ids_to_tokens([int(i) for i in ids]))
    return [str(int(i)) for i in ids]


def check_positions(prompt: Prompt, positions: Sequence[int]) -> list[int]:
    length = prompt.ids.shape[1]
    if not positions:
        raise DiverifyError("choose at least one position to perturb")
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise DiverifyError(f"position(s) {bad} out of range: the prompt has {length} tokens (0..{length - 1})")
    return sorted(set(int(p) for p in positions))


def positions_of_words(encoder, prompt: Prompt, words: Sequence[str]) -> list[int]:
    """Token positions whose token is one of ``words`` (as the tokenizer spells it)."""
    found = []
    for w in words:
        wid, _ = encoder.tokenize([w])
        pieces = [t for t in _token_strings(encoder, np.asarray(wid)[0]) if t not in _special_tokens(encoder)]
        hits = [i for i, t in enumerate(prompt.tokens) if t in pieces]
        if not hits:
            raise DiverifyError(f"word '{w}' does not occur in the prompt (tokens: {' '.join(prompt.tokens)})")
        found.extend(hits)
    return sorted(set(found))


def _special_tokens(encoder) -> set[str]:
    tok = _tokenizer(encoder)
    return set(getattr(tok, "all_special_tokens", []) or [])


def embedding_ball(encoder, prompt: Prompt, positions: Sequence[int], eps: float, norm: float = np.inf) -> LpBall:
    """The l_p ball of radius ``eps`` around the word embeddings at ``positions``."""
    positions = check_positions(prompt, positions)
    we = encoder.word_embeddings(jnp.asarray(prompt.ids))
    mask = np.zeros(we.shape[:-1] + (1,), np.float32)
    mask[:, positions] = 1.0
    return lp_ball(we, eps, p=norm, mask=mask, support=positions)


def substitution_set(encoder, prompt: Prompt, substitutions: dict[int, Sequence[int]]) -> tuple[Substitution, list]:
    """Convex hull of the original and substitute word embeddings at each position,
    and the token ids of each position's vertices (the original first)."""
    if not substitutions:
        raise DiverifyError("give at least one position with substitute tokens")
    positions = check_positions(prompt, list(substitutions))
    we = encoder.word_embeddings(jnp.asarray(prompt.ids))
    table_ids = []
    for p in positions:
        subs = [int(t) for t in substitutions[p]]
        if not subs:
            raise DiverifyError(f"empty substitution list for position {p}")
        table_ids.append([int(prompt.ids[0, p])] + [t for t in subs if t != int(prompt.ids[0, p])])
    cands = [np.asarray(encoder.word_embeddings(jnp.asarray([ids])))[0] for ids in table_ids]
    s = substitution(we, positions, cands)
    return dataclasses.replace(s, positions=jnp.asarray(positions)), table_ids


def unit_cosines(targets: jax.Array, e: jax.Array) -> jax.Array:
    """``targets @ (e / ||e||)`` (rows of ``targets`` unit norm), the product at full precision.

    Computed as ``(targets @ e) * rsqrt(sum e^2)``: the bound engine then relaxes one product
    of two bounded quantities per concept, not one per coordinate of ``e`` before a sum that
    adds up their errors (MiniLM, one layer, "a photo of a cat" against "a photo of a dog",
    l_inf 7e-4: the cosine's bound 8.9x the attack's excess instead of 10.9x)."""
    return jnp.matmul(targets, e, precision=jax.lax.Precision.HIGHEST) * jax.lax.rsqrt(jnp.sum(e * e))


def cosine_function(encoder, prompt: Prompt, concept_embeddings: jax.Array):
    """``we -> cos(emb(we), t_c)`` for every concept (rows of ``concept_embeddings``, unit norm).

    The embedding is the checkpoint's pooled output; it is normalised here
    (``e * rsqrt(sum e^2)``) whatever the pipeline says, since a cosine is asked.
    """
    params, mask, ids = encoder.params, prompt.mask, prompt.ids
    targets = jnp.asarray(concept_embeddings, jnp.float32)

    def fn(we):
        return unit_cosines(targets, encoder.pooled_from_word_embeddings(params, we, mask, ids)[0])

    return fn


def pooled_function(encoder, prompt: Prompt):
    """``we -> pooled, un-normalised embedding`` of the prompt (shape ``(D,)``)."""
    params, mask, ids = encoder.params, prompt.mask, prompt.ids
    return lambda we: encoder.pooled_from_word_embeddings(params, we, mask, ids)[0]


def concept_embeddings(encoder, concepts: Sequence[str]) -> jax.Array:
    if not concepts:
        raise DiverifyError("give at least one restricted concept")
    e = jnp.asarray(encoder.embed(list(concepts)), jnp.float32)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


# --------------------------------------------------------------------------
# Attacks: lower bounds on the worst case, and witnesses of collisions.


def pgd_attack(fn, steps: int = 50, restarts: int = 4):
    """Projected gradient ascent of each output of ``fn`` over an l_p ball, compiled once.

    Returns a jitted ``attack(ball, key) -> (best value per output, the maximising
    inputs)``. The ball's centre, radius and mask are traced data (only its shapes
    and norm are static), so a search over eps (:func:`certified_radius`) runs one
    executable per ball shape instead of recompiling at every radius. Each output
    gets ``restarts`` random starts and ``steps`` signed-gradient (l_inf) or
    normalised-gradient (l_1, l_2) steps of size ``2.5 eps / steps``; the best
    point seen is kept. A lower bound on the maximum, never a certificate.
    """

    @jax.jit
    def attack(ball: LpBall, key):
        n_out = jax.eval_shape(fn, ball.center).shape[0]
        radius = ball.eps * ball.active_mask

        def project(x):
            d = (x - ball.center) * ball.active_mask
            if ball.p == np.inf:
                d = jnp.clip(d, -radius, radius)
            else:
                if ball.p == 2.0:
                    nrm = jnp.linalg.norm(d, axis=-1, keepdims=True)
                else:
                    nrm = jnp.sum(jnp.abs(d), -1, keepdims=True)
                d = d * jnp.minimum(1.0, ball.eps / jnp.maximum(nrm, 1e-30))
            return ball.center + d

        def ascend(k, start_key):
            grad = jax.grad(lambda x: fn(x)[k])
            x0 = project(ball.center + radius * jax.random.uniform(start_key, ball.center.shape, minval=-1, maxval=1))
            step = 2.5 * jnp.maximum(ball.eps, 1e-12) / steps

            def body(_, carry):
                x, best_x, best = carry
                g = grad(x)
                if ball.p == np.inf:
                    direction = jnp.sign(g)
                else:
                    direction = g / jnp.maximum(jnp.linalg.norm(g * ball.active_mask, axis=-1, keepdims=True), 1e-30)
                x = project(x + step * direction * ball.active_mask)
                val = fn(x)[k]
                better = val > best
                return x, jnp.where(better, x, best_x), jnp.where(better, val, best)

            _, best_x, best = jax.lax.fori_loop(0, steps, body, (x0, x0, fn(x0)[k]))
            return best, best_x

        keys = jax.random.split(key, restarts)
        vals, xs = jax.vmap(jax.vmap(ascend, in_axes=(None, 0)), in_axes=(0, None))(jnp.arange(n_out), keys)
        best = jnp.argmax(vals, axis=1)  # (n_out, restarts) -> the best restart per output
        return vals[jnp.arange(n_out), best], xs[jnp.arange(n_out), best]

    return attack


def pgd_max(fn, ball: LpBall, key, steps: int = 50, restarts: int = 4):
    """One PGD attack (:func:`pgd_attack`) on ``ball``: (best value per output, the maximising inputs).
    To attack many radii of the same ball, build :func:`pgd_attack` once and call it."""
    return pgd_attack(fn, steps, restarts)(ball, key)


def _substitution_evaluator(fn, s: Substitution):
    """``choices (N, P) -> fn`` at the substitution vertices those candidate indices pick, compiled."""
    n_pos = len(np.asarray(s.positions))

    def point(choice):
        vecs = s.candidates[jnp.arange(n_pos), jnp.asarray(choice)]
        return s.base.at[..., s.positions, :].set(vecs)

    return jax.jit(jax.vmap(lambda c: fn(point(c))))


def all_substitutions(fn, s: Substitution, table_ids) -> tuple[np.ndarray, np.ndarray]:
    """Every combination of the substitution lists (``choices``, shape ``(N, P)``) and
    ``fn`` at each (``values``, shape ``(N, outputs)``), evaluated in chunks."""
    sizes = [len(t) for t in table_ids]
    choices = np.array(list(itertools.product(*[range(n) for n in sizes])), dtype=np.int32)
    evaluate = _substitution_evaluator(fn, s)
    values = np.concatenate([np.asarray(evaluate(jnp.asarray(choices[i:i + 256]))) for i in range(0, len(choices), 256)])
    return choices, values


def _substitution_witness(s: Substitution, table_ids, choice) -> dict:
    """``{"substitution": {position: token id}}`` for one choice of candidate indices."""
    return {"substitution": {int(p): int(table_ids[j][int(choice[j])]) for j, p in enumerate(np.asarray(s.positions))}}


def search_substitutions(fn, s: Substitution, table_ids, max_exhaustive: int = MAX_EXHAUSTIVE):
    """Best substitution (vertex) for each output: exhaustive when the product of
    the lists is small, greedy coordinate ascent otherwise."""
    sizes = [len(t) for t in table_ids]
    n_pos = len(sizes)
    if int(np.prod(sizes)) <= max_exhaustive:
        choices, vals = all_substitutions(fn, s, table_ids)
        best = vals.argmax(0)
        return vals.max(0), [choices[b] for b in best]
    evaluate = _substitution_evaluator(fn, s)
    n_out = int(jax.eval_shape(fn, s.base).shape[0])
    results, picks = [], []
    for out in range(n_out):
        choice = np.zeros(n_pos, np.int32)
        for _ in range(3):
            for p in range(n_pos):
                trials = np.repeat(choice[None], sizes[p], 0)
                trials[:, p] = np.arange(sizes[p])
                choice = trials[int(np.asarray(evaluate(jnp.asarray(trials)))[:, out].argmax())]
        results.append(float(np.asarray(evaluate(jnp.asarray(choice[None])))[0, out]))
        picks.append(choice)
    return np.asarray(results), picks


# --------------------------------------------------------------------------
# Certificates.


@dataclasses.dataclass(frozen=True)
class ConceptVerdict:
    """One concept's answer. ``cosine_upper`` / ``cosine_lower`` are ``None`` when the
    bound could not be computed; ``reason`` says why the verdict is what it is
    (:func:`concept_verdict`)."""

    concept: str
    status: Status
    cosine_upper: float | None
    cosine_lower: float | None
    cosine_clean: float
    attack_cosine: float
    witness: dict | None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Certificate:
    model: str
    prompt: str | None
    ids: list
    tokens: list
    perturbation: dict
    method: str
    intermediate_method: str
    threshold: float
    certified: bool
    precision: str
    concepts: list
    seconds: float
    compile_seconds: float


def checked_bound(call):
    """``(call(), None)``, or ``(None, message)`` when the engine reports that the bound
    cannot be computed on this set (a domain or float32-range failure, a non-finite
    bound). An unsupported primitive is a property of the model and method, not of
    the set, and is re-raised."""
    try:
        return call(), None
    except UnsupportedPrimitiveError:
        raise
    except DiverifyError as e:
        return None, str(e)


def certify(encoder, prompt: Prompt, input_set, concepts: Sequence[str], threshold: float,
            method: str = "crown", table_ids=None, attack: bool = True, seed: int = 0,
            concept_vectors=None, precision: str = "float32", symbols: int | None = None,
            refine: str = "normalisers") -> Certificate:
    """Certify (or refute) that no point of ``input_set`` brings the prompt's embedding
    within cosine ``threshold`` of any restricted concept (embedded with the same
    encoder, or given as ``concept_vectors``, one row per concept).

    Each concept is *certified* (sound upper bound < threshold), a *collision*
    (the attack reached the threshold; witness attached) or *unknown*. When the
    bound cannot be computed on ``input_set`` (:func:`checked_bound`) no concept
    is certified: the attack runs and the engine's message is the reason of
    every concept it does not refute. ``seconds`` is then the failed bound's
    compilation and run time. ``precision``: the bound's arithmetic, ``symbols``:
    the zonotope's order-reduction budget, ``refine``: which of its intervals CROWN
    tightens (all three :func:`diverify.bounds.compile_bounds`).

    ``method="exhaustive"`` (substitution sets only, at most
    :data:`MAX_EXHAUSTIVE` combinations) evaluates every combination of the
    token lists instead of bounding their convex hull: exact for the discrete
    set, and the answer for long models whose hull bound is vacuous;
    ``cosine_upper`` / ``cosine_lower`` are then the highest / lowest cosine seen."""
    if not -1.0 <= threshold <= 1.0:
        raise DiverifyError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    if concept_vectors is None:
        targets = concept_embeddings(encoder, concepts)
    else:
        targets = jnp.asarray(concept_vectors, jnp.float32)
        targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
    fn = cosine_function(encoder, prompt, targets)
    if method == "exhaustive":
        return _certify_exhaustive(encoder, prompt, fn, input_set, concepts, threshold, table_ids)
    t0 = time.perf_counter()
    bf = compile_bounds(fn, input_set, method=method, precision=precision, symbols=symbols, refine=refine)
    trace_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    timed, bound_error = checked_bound(lambda: bf.timed(input_set))
    if timed is None:
        compile_seconds, bound_seconds = 0.0, time.perf_counter() - t1
        upper = lower = np.full(len(concepts), np.nan)
    else:
        result, compile_seconds, bound_seconds = timed
        upper, lower = np.asarray(result.output.upper), np.asarray(result.output.lower)
    clean = np.asarray(jax.jit(fn)(_clean_point(input_set)))  # one compilation, not one per operation
    attack_vals = np.full(len(concepts), -np.inf)
    witnesses: list = [None] * len(concepts)
    if attack and (bound_error is not None or np.any(upper >= threshold)):
        if isinstance(input_set, Substitution):
            vals, picks = search_substitutions(fn, input_set, table_ids)
            attack_vals = np.asarray(vals)
            witnesses = [_substitution_witness(input_set, table_ids, c) for c in picks]
        else:
            vals, xs = pgd_max(fn, input_set, jax.random.PRNGKey(seed))
            attack_vals = np.asarray(vals)
            for i in range(len(concepts)):
                delta = np.asarray((xs[i] - input_set.center) * input_set.mask)
                witnesses[i] = {"delta_norm": float(np.linalg.norm(delta.ravel(), ord=np.inf if input_set.p == np.inf else input_set.p)),
                                "delta": delta[0][np.asarray(input_set.mask)[0, :, 0] > 0].tolist()}
    verdicts = []
    for i, c in enumerate(concepts):
        status, reason = concept_verdict(float(upper[i]), float(attack_vals[i]), threshold, attack, bound_error)
        verdicts.append(ConceptVerdict(
            c, status, None if bound_error else float(upper[i]), None if bound_error else float(lower[i]),
            float(clean[i]), float(attack_vals[i]), witnesses[i] if status == "collision" else None, reason))
    return Certificate(
        model=encoder.name,
        prompt=prompt.text,
        ids=[int(i) for i in prompt.ids[0]],
        tokens=list(prompt.tokens),
        perturbation=describe_set(input_set),
        method=bf.method,
        intermediate_method=INTERMEDIATE[bf.method],
        threshold=float(threshold),
        certified=all(v.status == "certified" for v in verdicts),
        precision=precision,
        concepts=verdicts,
        seconds=bound_seconds,
        compile_seconds=trace_seconds + compile_seconds,
    )


def _certify_exhaustive(encoder, prompt: Prompt, fn, s, concepts, threshold: float, table_ids) -> Certificate:
    """The ``exhaustive`` method: evaluate the model at every combination of a
    substitution set's tokens. Exact for the discrete set (the token lists),
    which is the threat of a trigger word; it says nothing of the convex hull
    that the bound methods cover."""
    if not isinstance(s, Substitution) or table_ids is None:
        raise DiverifyError("method 'exhaustive' enumerates a substitution set (token lists); an l_p ball is "
                            "infinite: use a bound method such as crown")
    total = int(np.prod([len(t) for t in table_ids]))
    if total > MAX_EXHAUSTIVE:
        raise DiverifyError(f"{total} substitution combinations exceed the exhaustive method's limit of "
                            f"{MAX_EXHAUSTIVE}: shorten the lists, or use a bound method (it covers their convex hull)")
    t0 = time.perf_counter()
    choices, values = all_substitutions(fn, s, table_ids)
    seconds = time.perf_counter() - t0
    clean = values[0]  # choice (0, ..., 0): the prompt's own tokens
    verdicts = []
    for i, c in enumerate(concepts):
        k = int(values[:, i].argmax())
        best, low = float(values[k, i]), float(values[:, i].min())
        witness = _substitution_witness(s, table_ids, choices[k])
        if best >= threshold:
            status, reason = "collision", f"substitution {witness['substitution']} reaches cosine {best:.6g} >= threshold {threshold:.6g}"
        elif best < threshold - EXHAUSTIVE_MARGIN:
            status, reason = "certified", (f"all {total} substitutions evaluated: the highest cosine {best:.6g} < threshold "
                                           f"{threshold:.6g} (exact for these tokens, not their convex hull)")
        else:
            status, reason = "unknown", (f"all {total} substitutions evaluated: the highest cosine {best:.6g} is within "
                                         f"float32 rounding ({EXHAUSTIVE_MARGIN:g}) of the threshold {threshold:.6g}")
        verdicts.append(ConceptVerdict(c, status, best, low, float(clean[i]), best,
                                       witness if status == "collision" else None, reason))
    return Certificate(
        model=encoder.name, prompt=prompt.text, ids=[int(i) for i in prompt.ids[0]], tokens=list(prompt.tokens),
        perturbation={**describe_set(s), "combinations": total}, method="exhaustive", intermediate_method="none",
        threshold=float(threshold), certified=all(v.status == "certified" for v in verdicts), precision="float32",
        concepts=verdicts, seconds=seconds, compile_seconds=0.0)


def concept_verdict(upper: float, attacked: float, threshold: float, attack: bool, bound_error: str | None):
    """(status, reason) for one concept: certified when the bound exists and is below the
    threshold, a collision when the attack reached it, unknown otherwise (the reason says which)."""
    if bound_error is None and upper < threshold:
        return "certified", f"cosine upper bound {upper:.6g} < threshold {threshold:.6g}"
    if attacked >= threshold:
        return "collision", f"the attack reached cosine {attacked:.6g} >= threshold {threshold:.6g}"
    if bound_error is not None:
        return "unknown", f"no bound: {bound_error}"
    found = f"the attack reached only {attacked:.6g}" if attack else "no attack was run"
    return "unknown", f"cosine upper bound {upper:.6g} >= threshold {threshold:.6g} and {found}"


def _clean_point(input_set):
    if isinstance(input_set, Substitution):
        return input_set.base.at[..., input_set.positions, :].set(input_set.candidates[:, 0])
    return input_set.center


def describe_set(s) -> dict:
    if isinstance(s, Substitution):
        return {"kind": "substitution", "positions": [int(p) for p in np.asarray(s.positions)], "candidates_per_position": int(s.candidates.shape[1])}
    positions = [int(p) for p in np.nonzero(np.asarray(s.mask)[0, :, 0])[0]]
    norm = "inf" if s.p == np.inf else int(s.p)
    return {"kind": "lp_ball", "norm": norm, "eps": float(s.eps), "positions": positions}


@dataclasses.dataclass(frozen=True)
class RadiusResult:
    model: str
    prompt: str | None
    positions: list
    norm: str
    threshold: float
    method: str
    precision: str
    certified_radius: float
    attack_radius: float | None
    ratio: float | None
    bisection_steps: int
    seconds: float


#: The radius search spans this many decades below ``eps_max``.
RADIUS_DECADES = 6.0


def certified_radius(encoder, prompt: Prompt, positions: Sequence[int], concepts: Sequence[str], threshold: float,
                     norm: float = np.inf, method: str = "crown", eps_max: float = 0.1, steps: int = 12,
                     seed: int = 0, progress=None, concept_vectors=None, precision: str = "float32",
                     symbols: int | None = None, refine: str = "normalisers") -> RadiusResult:
    """Largest eps at which every concept is certified, and the smallest eps
    at which PGD finds a collision: the true robust radius lies between them.

    Both are bisected in log space over ``[eps_max * 1e-6, eps_max]`` (certified
    radii of transformers span decades, so a linear bisection from ``eps_max``
    would round them to 0); a radius below that range is reported as 0. The
    bound function and the PGD attack are each compiled once: eps is traced
    data in both, so every bisection step reuses the same two executables.
    ``concept_vectors`` (one row per concept) replaces embedding ``concepts`` with the encoder;
    ``precision``, ``symbols`` and ``refine`` as in :func:`diverify.bounds.compile_bounds`."""
    t0 = time.perf_counter()
    if concept_vectors is None:
        targets = concept_embeddings(encoder, concepts)
    else:
        targets = jnp.asarray(concept_vectors, jnp.float32)
        targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
    fn = cosine_function(encoder, prompt, targets)
    ball = embedding_ball(encoder, prompt, positions, eps_max, norm)
    bf = compile_bounds(fn, ball, method=method, precision=precision, symbols=symbols, refine=refine)

    def is_certified(eps):
        # A bound the engine cannot compute at eps certifies nothing (checked_bound).
        result, _ = checked_bound(lambda: bf(dataclasses.replace(ball, eps=jnp.float32(eps))))
        return result is not None and bool(np.all(np.asarray(result.output.upper) < threshold))

    attack = pgd_attack(fn)

    def collides(eps):
        vals, _ = attack(dataclasses.replace(ball, eps=jnp.float32(eps)), jax.random.PRNGKey(seed))
        return bool(np.any(np.asarray(vals) >= threshold))

    floor = eps_max * 10.0 ** -RADIUS_DECADES
    lo, hi = floor, eps_max
    n = 0
    if is_certified(hi):
        lo = hi
    elif not is_certified(floor):
        lo = 0.0
    else:
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            n += 1
            if is_certified(mid):
                lo = mid
            else:
                hi = mid
            if progress:
                progress(n)
    attack_radius = None
    if collides(eps_max):
        a_lo, a_hi = max(lo, floor), eps_max
        for _ in range(steps):
            mid = math.sqrt(a_lo * a_hi)
            if collides(mid):
                a_hi = mid
            else:
                a_lo = mid
        attack_radius = a_hi
    return RadiusResult(
        model=encoder.name,
        prompt=prompt.text,
        positions=check_positions(prompt, positions),
        norm="inf" if norm == np.inf else str(int(norm)),
        threshold=float(threshold),
        method=method,
        precision=precision,
        certified_radius=lo,
        attack_radius=attack_radius,
        ratio=None if attack_radius is None else lo / attack_radius,
        bisection_steps=n,
        seconds=time.perf_counter() - t0,
    )
