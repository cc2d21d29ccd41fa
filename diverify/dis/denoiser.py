"""DIS for class-conditional denoisers: the path KL of the ancestral sampler bounds KL(P(x_0|c) || P(x_0|c')).

The DDPM ancestral sampler is a Markov chain whose step i is Gaussian,
``x_{i+1} ~ N(mu_i(x_i, c), sigma_i^2 I)``, with the same ``sigma_i`` for every conditioning.  By the chain rule
of KL and the data-processing inequality, for two conditionings c, c' and the same start x_T ~ N(0, I),

    KL(P(x_0 | c) || P(x_0 | c'))  <=  KL(path | c || path | c')
                                    =  sum_i E_{x_i ~ P(. | c)} ||mu_i(x_i, c) - mu_i(x_i, c')||^2 / (2 sigma_i^2).

The last step (t = 0) of the sampler is deterministic (sigma = 0), which would make the path KL infinite for any
change of its mean; P(x_0 | c) is therefore the sampler's output read through a Gaussian decoder of std
``sqrt(1 - abar_0)`` (0.01 for the usual linear betas), the role Ho et al.'s discrete decoder plays.

Steps whose std is 0.01 weigh a mean change by 1 / (2 * 0.01^2) = 5000: they turn pixel-level detail that no
reader of an 8x8 digit could see into most of the KL.  ``resolution`` therefore stops the path at the first step
whose std falls below it: the bound is then on KL(P(x_s | c) || P(x_s | c')) for the sampler's state x_s at
that point, "x_0 at resolution sigma".  :func:`denoiser_dis` uses ``resolution = 1/16``, half a grey level of
the digits: for the 50-step DDPM chain x_s is the state at t = 20, whose own noise std is 0.079.
``resolution = 0`` keeps the whole path and the decoder.

The expectation is estimated by Monte Carlo over ``samples`` sampled
trajectories: the estimate is unbiased for the path KL, so the bound is sound in expectation, and ``ci`` is a
Student-t interval (by the CLT, not a certificate).

The conditioning of a ``UNet2DModel`` with ``num_class_embeds`` is the vector ``emb(c) = w @ table`` that the
UNet adds to its timestep embedding (w = one-hot class weights).  A perturbation adds a vector delta to it, and
``dist = ||delta||_2`` is measured in that class-embedding space.  ``trigger:K`` adds table row K (the
embedding of a conditioning token, e.g. the fixture's trigger row); ``random[:R]`` adds a uniformly random
direction of norm R.  The detection score is ``dis = sqrt(2 KL) / dist`` (see :mod:`diverify.dis`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.diffusion.schedulers import (SamplingSchedule, apply_step, ddpm_schedule, read_noise_schedule,
                                           step_coefficients)
from diverify.dis import DISResult
from diverify.errors import DiverifyError

DEFAULT_STEPS = 50
DEFAULT_RESOLUTION = 1 / 16
CONFIDENCE = 0.95
FIXTURE_NAME = "fixture.json"


def path_stds(schedule: SamplingSchedule) -> np.ndarray:
    """The std of each Gaussian step of the path measure: the sampler's own sigma, and the decoder std
    ``sqrt(1 - abar_t / abar_prev)`` at a deterministic (t = 0) step."""
    if schedule.kind != "ddpm":
        raise DiverifyError(f"the path KL needs the ancestral (ddpm) sampler, got {schedule.kind!r}")
    stds = []
    for i in range(schedule.num_steps):
        c = step_coefficients(schedule, i)
        stds.append(c.noise_std if c.noise_std else math.sqrt(1.0 - c.alpha_prod_t / c.alpha_prod_prev))
    return np.asarray(stds, np.float64)


@dataclasses.dataclass(frozen=True)
class PathKL:
    """Monte-Carlo path KL: ``per_sample[j]`` is the KL summed along trajectory j, ``per_step`` its mean per step."""

    per_sample: np.ndarray
    per_step: np.ndarray

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
        """(mean, lo, hi): the estimate and its Student-t confidence interval, lo clipped at 0."""
        from scipy.stats import t as student_t

        n = self.per_sample.size
        mean = float(self.per_sample.mean())
        if n < 2:
            return mean, mean, mean
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * float(self.per_sample.std(ddof=1)) / math.sqrt(n)
        return mean, max(0.0, mean - half), mean + half


@functools.lru_cache(maxsize=16)
def _eps_pair(eps_fn: Callable) -> Callable:
    """``(params, x, t, both) -> (eps(x, c), eps(x, c'))`` in one batched call, jitted once per ``eps_fn``."""

    @jax.jit
    def pair(params, x, t, both):
        n = x.shape[0]
        eps = eps_fn(params, jnp.concatenate([x, x]), jnp.full((2 * n,), t, jnp.int32), both)
        return eps[:n], eps[n:]

    return pair


def path_kl(eps_fn: Callable, params: Any, cond: jax.Array, cond_perturbed: jax.Array, schedule: SamplingSchedule,
            x_T: jax.Array, key: jax.Array, resolution: float = 0.0) -> PathKL:
    """Estimate sum_i E||mu_i(x_i, c) - mu_i(x_i, c')||^2 / (2 sigma_i^2) along trajectories sampled under c.

    ``eps_fn(params, x, t, cond)`` is the eps-prediction; ``cond`` and ``cond_perturbed`` hold one row per
    trajectory (the rows of ``x_T``).  Step i draws its noise from ``fold_in(key, i)``.  The sum stops before
    the first step whose std is below ``resolution`` (module docstring).
    """
    stds = path_stds(schedule)
    kept = int(np.argmax(stds < resolution)) if np.any(stds < resolution) else len(stds)
    if kept == 0:
        raise DiverifyError(f"resolution {resolution} is above the std of every sampler step (max {stds.max():.3g})")
    n = x_T.shape[0]
    if np.shape(cond)[0] != n or np.shape(cond_perturbed) != np.shape(cond):
        raise DiverifyError(f"cond {np.shape(cond)} and cond_perturbed {np.shape(cond_perturbed)} must both have "
                            f"one row per trajectory ({n})")
    both = jnp.concatenate([jnp.asarray(cond), jnp.asarray(cond_perturbed)])
    eps_pair = _eps_pair(eps_fn)
    x = jnp.asarray(x_T)
    terms = []
    for i in range(kept):
        coeffs = step_coefficients(schedule, i)
        eps, eps_perturbed = eps_pair(params, x, coeffs.t, both)
        mean_coeffs = dataclasses.replace(coeffs, noise_std=0.0)
        mu = apply_step(mean_coeffs, x, eps)
        mu_perturbed = apply_step(mean_coeffs, x, eps_perturbed)
        diff = np.asarray(mu, np.float64) - np.asarray(mu_perturbed, np.float64)
        terms.append(np.sum(diff.reshape(n, -1) ** 2, axis=1) / (2.0 * stds[i] ** 2))
        x = mu
        if coeffs.noise_std:
            x = mu + coeffs.noise_std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    terms = np.stack(terms, axis=1)
    return PathKL(terms.sum(axis=1), terms.mean(axis=0))


def dis_from_path_kl(kl: PathKL, dist: float, *, model_kind: str, perturbation: str, seconds: float,
                     details: dict[str, Any] | None = None) -> DISResult:
    """A :class:`DISResult` (dis = sqrt(2 KL) / dist, kl_ratio = KL / dist) from a path-KL estimate."""
    if not dist > 0 or not math.isfinite(dist):
        raise DiverifyError(f"the perturbation has size {dist}: DIS needs a nonzero finite dist")
    mean, lo, hi = kl.interval()
    if not all(math.isfinite(v) for v in (mean, lo, hi)):
        raise DiverifyError("the path KL is not finite (the denoiser produced NaN/Inf)")
    extra = {"per_step_kl": kl.per_step.tolist(), "kl_ci": [lo, hi], "confidence": CONFIDENCE,
             "per_sample_kl_quartiles": np.quantile(kl.per_sample, [0.25, 0.5, 0.75]).tolist()}
    extra.update(details or {})
    return DISResult(dis=math.sqrt(2 * mean) / dist, ci=(math.sqrt(2 * lo) / dist, math.sqrt(2 * hi) / dist),
                     kl=mean, dist=float(dist), kl_ratio=mean / dist, model_kind=model_kind,
                     perturbation=perturbation, samples=int(kl.per_sample.size), seconds=seconds, details=extra)


def _fixture_trigger_row(model_dir: Path) -> int | None:
    path = model_dir / FIXTURE_NAME
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text()).get("trigger_row")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise DiverifyError(f"{path} is malformed: {err}") from None
    return None if row is None else int(row)


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DiverifyError(f"{what} must be an integer class-embedding row, got {text!r}") from None


def perturbation_vector(table: np.ndarray, prompt_row: int, perturbation: str, seed: int,
                        fixture_trigger_row: int | None = None) -> np.ndarray:
    """The vector delta added to emb(prompt) for ``trigger:K`` / ``trigger`` / ``random`` / ``random:R``.

    ``trigger`` alone uses the trigger row recorded in the model's ``fixture.json``.  ``random`` without R is
    matched in size to that trigger row when there is one, else to the mean norm of the table's rows.
    """
    rows = table.shape[0]
    kind, _, arg = perturbation.partition(":")
    if kind == "trigger":
        if arg:
            row = _parse_int(arg, "the trigger")
        elif fixture_trigger_row is not None:
            row = fixture_trigger_row
        else:
            raise DiverifyError("perturbation 'trigger' needs a row (trigger:K) when the model has no fixture.json")
        if not 0 <= row < rows:
            raise DiverifyError(f"trigger row {row} is outside the class-embedding table (rows 0..{rows - 1})")
        if row == prompt_row:
            raise DiverifyError(f"trigger row {row} is the prompt's own row: the perturbation would be the prompt")
        return np.asarray(table[row], np.float64)
    if kind == "random":
        if arg:
            try:
                radius = float(arg)
            except ValueError:
                raise DiverifyError(f"random:R needs a number R, got {arg!r}") from None
        elif fixture_trigger_row is not None and 0 <= fixture_trigger_row < rows:
            radius = float(np.linalg.norm(table[fixture_trigger_row]))
        else:
            radius = float(np.mean(np.linalg.norm(table, axis=1)))
        if not radius > 0 or not math.isfinite(radius):
            raise DiverifyError(f"random:R needs a positive finite R, got {radius}")
        direction = np.random.default_rng(seed).standard_normal(table.shape[1])
        return radius * direction / np.linalg.norm(direction)
    raise DiverifyError(f"unknown perturbation {perturbation!r} (use trigger:K, trigger, random or random:R)")


def conditional_denoiser_with_delta(den, delta: np.ndarray):
    """The denoiser with ``delta`` appended as an extra class-embedding row, so that the class weights
    ``e_c + e_extra`` give the embedding ``emb(c) + delta``; returns (denoiser, extra row index)."""
    table = np.asarray(den.params["class_embedding"]["embedding"])
    params = dict(den.params)
    params["class_embedding"] = {"embedding": jnp.asarray(np.concatenate([table, delta[None].astype(table.dtype)]))}
    config = {**den.raw_config, "num_class_embeds": table.shape[0] + 1}
    return dataclasses.replace(_shell(json.dumps(config, sort_keys=True)), params=params), table.shape[0]


@functools.lru_cache(maxsize=8)
def _shell(config_json: str):
    """A parameterless denoiser per config, so that its apply function (and what jit compiled for it) is reused
    by every DIS computation on the same architecture."""
    from diverify.models.diffusers_checkpoint import build_denoiser

    return build_denoiser(json.loads(config_json), params={})


def denoiser_dis(model_dir: str | Path, prompt: str, perturbation: str, samples: int = 32, seed: int = 0,
                 steps: int = DEFAULT_STEPS, resolution: float = DEFAULT_RESOLUTION) -> DISResult:
    """DIS of a class-conditional diffusers ``UNet2DModel`` for class ``prompt`` (an integer row, e.g. "3").

    Samples ``samples`` ancestral trajectories with ``steps`` DDPM steps under the prompt and returns the
    path-KL bound on KL(P(x_0|c) || P(x_0|c')) at ``resolution`` (module docstring), its CI,
    ``dist = ||delta||_2`` in class-embedding space and
    ``dis = sqrt(2 KL) / dist`` (module docstring).
    """
    from diverify.models.diffusers_checkpoint import load_denoiser

    start = time.perf_counter()
    if samples < 2:
        raise DiverifyError(f"--samples must be at least 2 for a confidence interval, got {samples}")
    model_dir = Path(model_dir)
    den = load_denoiser(model_dir)
    if den.class_name != "UNet2DModel" or den.config.num_class_embeds is None:
        raise DiverifyError(f"denoiser DIS needs a class-conditional UNet2DModel (num_class_embeds set); "
                            f"{str(model_dir)!r} is a {den.class_name} without a class embedding")
    table = np.asarray(den.params["class_embedding"]["embedding"])
    prompt_row = _parse_int(prompt.strip(), "the prompt")
    if not 0 <= prompt_row < table.shape[0]:
        raise DiverifyError(f"prompt class {prompt_row} is outside the class-embedding table (0..{table.shape[0] - 1})")
    delta = perturbation_vector(table, prompt_row, perturbation, seed, _fixture_trigger_row(model_dir))
    augmented, extra = conditional_denoiser_with_delta(den, delta)
    schedule = ddpm_schedule(read_noise_schedule(model_dir), steps)
    size = den.sample_size
    key = jax.random.PRNGKey(seed)
    x_T = jax.random.normal(jax.random.fold_in(key, 10**6), (samples, den.in_channels, size, size), jnp.float32)
    cond = jax.nn.one_hot(jnp.full((samples,), prompt_row), extra + 1)
    cond_perturbed = cond + jax.nn.one_hot(jnp.full((samples,), extra), extra + 1)
    kl = path_kl(augmented.eps, augmented.params, cond, cond_perturbed, schedule, x_T, key, resolution)
    stds = path_stds(schedule)
    kept = kl.per_step.size
    return dis_from_path_kl(kl, float(np.linalg.norm(delta)), model_kind="denoiser", perturbation=perturbation,
                            seconds=time.perf_counter() - start,
                            details={"model": str(model_dir), "prompt_class": prompt_row, "sampler": "ddpm",
                                     "steps": steps, "resolution": resolution,
                                     "output_state": (f"x_0 with decoder std {stds[-1]:.3g}" if kept == len(stds)
                                                      else f"x at t={schedule.timesteps[kept]}"),
                                     "dist_space": "class embedding (added to the timestep embedding)"})
