"""DIS for text encoders: how far a prompt perturbation moves the normalised embedding, per token changed.

For a prompt ``p`` and perturbed prompts ``p'_k`` (k = 1..K) drawn from a perturbation family, with
``e(.)`` the encoder's embedding divided by its norm::

    shift_k = ||e(p'_k) - e(p)||_2,      dist_k = number of tokens inserted or substituted,
    DIS     = mean_k shift_k / dist_k    (a Student-t confidence interval over the K samples).

``kl`` is ``mean_k shift_k^2 / 2``: the KL divergence between isotropic unit-variance Gaussians centred on
the two embeddings, so that ``sqrt(2 kl)`` is the shift and the text score is the same scale-consistent
``sqrt(2 KL) / dist`` that :mod:`diverify.dis` uses for denoisers.

Perturbation families (``dist`` is counted in tokens, so that a trigger and its matched control cost the
same):

- ``trigger:TOKEN`` inserts the word TOKEN before a uniformly drawn word position (dist = its token count);
- ``random`` inserts a uniformly drawn whole-word single-token vocabulary entry the same way (dist = 1), the
  matched-size control of a single-token trigger;
- ``substitution:W=a,b,c`` replaces every occurrence of the word W by one of a, b, c drawn uniformly
  (single tokens; dist = the number of occurrences).

Certified upper bound (``radius`` / automatic for substitutions): the bound engine bounds, for every
output coordinate, ``e(x) - e(x_0)`` over an l2 ball of word embeddings at the perturbed positions, and
``U = sqrt(sum_i max(l_i^2, u_i^2)) >= max_x ||e(x) - e(x_0)||_2`` (sound in exact arithmetic; the engine
pads for float32 rounding).  For a substitution the ball is centred on W's embedding with the largest
substitute distance as radius, so it contains every substitute and ``U / dist`` bounds every sampled
ratio in DIS's own units.  An insertion changes the sequence length, so no word-embedding ball contains it;
there the certificate is local: the ball of ``radius`` around the inserted token's embedding in the first
perturbed prompt, reported as ``U / radius`` per unit of word-embedding l2 change.  Full MiniLM is costly
to bound (minutes of compilation on CPU, and the LayerNorm variance bound leaves its domain beyond radii of
~1e-5); ``layers`` truncates the encoder *for the certificate only*, which then bounds the truncated encoder,
as ``details["certified_encoder"]`` says.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diverify.dis import DISResult
from diverify.errors import DiverifyError

#: Confidence level of the interval around the mean ratio.
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A parsed ``--perturbation``: ``kind`` in trigger/random/substitution and its arguments."""

    kind: str
    token: str | None = None
    word: str | None = None
    substitutes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "trigger":
            return f"trigger:{self.token}"
        if self.kind == "substitution":
            return f"substitution:{self.word}={','.join(self.substitutes)}"
        return "random"


def parse_perturbation(spec: str) -> Perturbation:
    """``trigger:TOKEN``, ``random`` or ``substitution:W=a,b,c`` as a :class:`Perturbation`."""
    text = spec.strip()
    if text == "random":
        return Perturbation("random")
    if text.startswith("trigger:"):
        token = text.split(":", 1)[1].strip()
        if not token or len(token.split()) != 1:
            raise DiverifyError(f"--perturbation {spec!r}: trigger:TOKEN needs one word, e.g. trigger:cf")
        return Perturbation("trigger", token=token)
    if text.startswith("substitution:"):
        body = text.split(":", 1)[1]
        word, _, alts = body.partition("=")
        subs = tuple(a.strip() for a in alts.split(",") if a.strip())
        if not word.strip() or not subs:
            raise DiverifyError(f"--perturbation {spec!r}: expected substitution:W=a,b,c")
        return Perturbation("substitution", word=word.strip(), substitutes=subs)
    raise DiverifyError(f"--perturbation {spec!r}: expected trigger:TOKEN, random or substitution:W=a,b,c")


def _pieces(encoder, word: str) -> list[int]:
    ids, mask = encoder.tokenize([word])
    return [int(i) for i in np.asarray(ids)[0][np.asarray(mask)[0].astype(bool)][1:-1]]


def _single_token(encoder, word: str, what: str) -> int:
    pieces = _pieces(encoder, word)
    if len(pieces) != 1:
        raise DiverifyError(f"{what} {word!r} is {len(pieces)} tokens for this tokenizer; give a single-token word")
    return pieces[0]


def control_words(encoder) -> list[str]:
    """Whole-word, alphabetic, single-token vocabulary entries of 3+ letters: the random-insertion pool."""
    from diverify.cmav import _tokenizer

    tok = _tokenizer(encoder)
    if tok is None:
        raise DiverifyError(f"model {encoder.name!r} has no tokenizer files; DIS needs text prompts")
    special = set(getattr(tok, "all_special_tokens", []) or [])
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3 and w not in special)
    if not words:
        raise DiverifyError(f"model {encoder.name!r}: no whole-word vocabulary entries to draw random words from")
    return words


def perturbed_prompts(encoder, prompt: str, perturbation: Perturbation, samples: int,
                      seed: int = 0) -> tuple[list[str], np.ndarray, list[int]]:
    """``samples`` perturbed prompts, their token distances and the word position each insertion used."""
    words = prompt.split()
    if not words:
        raise DiverifyError("--prompt is empty")
    rng = np.random.default_rng(seed)
    texts, dists, positions = [], [], []
    if perturbation.kind == "substitution":
        hits = [i for i, w in enumerate(words) if w == perturbation.word]
        if not hits:
            raise DiverifyError(f"--perturbation: word {perturbation.word!r} does not occur in the prompt")
        _single_token(encoder, perturbation.word, "substituted word")
        for s in perturbation.substitutes:
            _single_token(encoder, s, "substitute")
        for _ in range(samples):
            new = list(words)
            for i in hits:
                new[i] = perturbation.substitutes[int(rng.integers(len(perturbation.substitutes)))]
            texts.append(" ".join(new))
            dists.append(len(hits))
            positions.append(hits[0])
        return texts, np.asarray(dists, np.float64), positions
    if perturbation.kind == "trigger":
        pool, dist = [perturbation.token], len(_pieces(encoder, perturbation.token))
    else:
        pool, dist = control_words(encoder), 1
    for _ in range(samples):
        at = int(rng.integers(len(words) + 1))
        inserted = pool[int(rng.integers(len(pool)))]
        texts.append(" ".join(words[:at] + [inserted] + words[at:]))
        dists.append(dist)
        positions.append(at)
    return texts, np.asarray(dists, np.float64), positions


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval for the mean of ``values`` (degenerate at the single value when K = 1)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return max(mean - half, 0.0), mean + half


def certified_shift(encoder, text: str, positions: Sequence[int], radius: float, method: str = "crown") -> float:
    """Sound ``U >= max ||e(x) - e(x_0)||_2`` over the l2 ball of ``radius`` on the word embeddings of the
    tokens at ``positions`` (token indices of ``text``'s tokenisation); see the module docstring."""
    from diverify import cmav
    from diverify.bounds import compile_bounds

    if not radius > 0 or not math.isfinite(radius):
        raise DiverifyError(f"certification radius must be a positive number, got {radius}")
    prompt = cmav.make_prompt(encoder, text)
    ball = cmav.embedding_ball(encoder, prompt, positions, radius, norm=2)
    pooled = cmav.pooled_function(encoder, prompt)

    def unit(we):
        e = pooled(we)
        return e * jax.lax.rsqrt(jnp.sum(e * e))

    e0 = unit(ball.center)
    out = compile_bounds(lambda we: unit(we) - e0, ball, method=method)(ball).output
    lo, hi = np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64)
    return float(np.sqrt(np.sum(np.maximum(lo * lo, hi * hi))))


def _token_position(encoder, words: Sequence[str], at: int) -> int:
    """Token index (after CLS) of the first token of word ``at``."""
    return 1 + sum(len(_pieces(encoder, w)) for w in words[:at])


def text_dis(encoder, prompt: str, perturbation: str | Perturbation, samples: int = 32, seed: int = 0,
             radius: float | None = None, certify: bool = False, layers: int | None = None,
             method: str = "crown") -> DISResult:
    """The embedding-space DIS of ``perturbation`` on ``prompt`` (module docstring), with the certified
    bound when ``certify`` (substitutions: automatic radius; insertions: ``radius`` required)."""
    from diverify.backdoors.text import embed_texts

    start = time.perf_counter()
    if samples < 1:
        raise DiverifyError(f"--samples {samples} must be at least 1")
    pert = parse_perturbation(perturbation) if isinstance(perturbation, str) else perturbation
    texts, dists, positions = perturbed_prompts(encoder, prompt, pert, samples, seed)
    emb = embed_texts(encoder, encoder.params, [prompt] + texts)
    shifts = np.linalg.norm(emb[1:].astype(np.float64) - emb[0], axis=-1)
    ratios = shifts / dists
    kl = float(np.mean(shifts ** 2) / 2)
    dist = float(dists.mean())
    details = {"shifts": shifts.tolist(), "dists": dists.tolist(), "examples": texts[:3],
               "confidence": CONFIDENCE}
    certified = None
    if certify:
        bound_encoder = encoder.with_layers(layers) if layers else encoder
        details["certified_encoder"] = bound_encoder.name
        if pert.kind == "substitution":
            centre = _single_token(encoder, pert.word, "substituted word")
            table = np.asarray(encoder.word_embeddings(np.asarray([[centre] + [
                _single_token(encoder, s, "substitute") for s in pert.substitutes]])))[0]
            ball_radius = float(np.max(np.linalg.norm(table[1:] - table[0], axis=-1))) * (1 + 1e-6)
            words = prompt.split()
            token_positions = [_token_position(encoder, words, i) for i, w in enumerate(words) if w == pert.word]
            u = certified_shift(bound_encoder, prompt, token_positions, ball_radius, method)
            certified = u / float(dists.min())
            details.update(certified_shift=u, certified_radius=ball_radius, certified_units="per token")
        else:
            if radius is None:
                raise DiverifyError("certifying an insertion needs --radius (an l2 ball around the inserted token)")
            words = texts[0].split()
            u = certified_shift(bound_encoder, texts[0], [_token_position(encoder, words, positions[0])],
                                float(radius), method)
            certified = u / float(radius)
            details.update(certified_shift=u, certified_radius=float(radius),
                           certified_units="per unit l2 of the inserted token's word embedding",
                           certified_prompt=texts[0])
    dis = float(ratios.mean())
    return DISResult(dis=dis, ci=mean_interval(ratios), kl=kl, dist=dist, kl_ratio=kl / dist,
                     model_kind="text-encoder", perturbation=pert.label, samples=int(samples),
                     seconds=time.perf_counter() - start, certified_upper=certified, details=details)
