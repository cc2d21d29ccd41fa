"""DDPM and DDIM reverse steps as pure maps x_t -> x_{t_prev}, matching diffusers' schedulers.

With abar the cumulative product of alpha = 1 - beta, an eps-prediction at
timestep t gives x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), optionally
clipped to [-r, r]. Both samplers then take the form

    x_prev = c_x0 * x0 + c_x * x_t + c_eps * eps + sigma * z,        z ~ N(0, I),

with, for DDIM (Song et al. 2021, eq. 12),
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)),
    c_x0 = sqrt(abar_prev), c_x = 0, c_eps = sqrt(1 - abar_prev - sigma^2),
and for DDPM ancestral sampling (Ho et al. 2020, eq. 7) with alpha_t = abar_t / abar_prev,
    c_x0 = sqrt(abar_prev) (1 - alpha_t) / (1 - abar_t), c_x = sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t),
    c_eps = 0, sigma^2 = max((1 - abar_prev) / (1 - abar_t) (1 - alpha_t), 1e-20) ("fixed_small") or
    1 - alpha_t ("fixed_large"), and no noise at t = 0.
Without clipping a step is therefore affine in (x_t, eps): this is what
:class:`StepCoefficients` exposes to the Lipschitz bounds. With clipping the
map x0 -> clip(x0) is 1-Lipschitz and monotone.

Timesteps follow diffusers' ``set_timesteps``: "leading" spacing
t_i = (T - 1 - i) * (N // T) + steps_offset (also "trailing" and "linspace"),
and t_prev = t - N // T; a negative t_prev uses abar = 1 (DDPM, and DDIM with
``set_alpha_to_one``) or abar_0.

The sampler is a Python loop over the static list of steps (not ``lax.scan``):
each step is a separate, individually addressable map (:func:`step_map`), and
the denoiser is jitted once and reused at every step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule: betas and abar (float32, as diffusers stores them)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def noise_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                   beta_schedule: str = "linear", clip_sample: bool = True,
                   clip_sample_range: float = 1.0) -> NoiseSchedule:
    """diffusers-compatible betas: "linear", "scaled_linear" (linear in sqrt(beta)) or
    "squaredcos_cap_v2" (Nichol & Dhariwal's cosine abar, betas capped at 0.999)."""
    n = int(num_train_timesteps)
    if n < 1:
        raise DiverifyError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64).astype(np.float32)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64).astype(np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise DiverifyError(f"beta_schedule {beta_schedule!r} is not supported "
                            f"(supported: {', '.join(BETA_SCHEDULES)})")
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    return NoiseSchedule(betas, alphas_cumprod, bool(clip_sample), float(clip_sample_range))


def noise_schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from a diffusers ``scheduler_config.json`` mapping (epsilon prediction only)."""
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise DiverifyError(f"scheduler prediction_type={config.get('prediction_type')!r} is not supported "
                            "(supported: 'epsilon')")
    if config.get("thresholding", False):
        raise DiverifyError("scheduler option thresholding=True is not supported")
    if config.get("trained_betas") is not None:
        raise DiverifyError("scheduler option trained_betas is not supported")
    return noise_schedule(config.get("num_train_timesteps", 1000), config.get("beta_start", 0.0001),
                          config.get("beta_end", 0.02), config.get("beta_schedule", "linear"),
                          config.get("clip_sample", True), config.get("clip_sample_range", 1.0))


SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def read_noise_schedule(directory: str | Path) -> NoiseSchedule:
    """The schedule of ``directory/scheduler_config.json`` (as written by diffusers or ``train-denoiser``);
    diffusers' DDPMScheduler defaults (1000 linear betas 1e-4..0.02, clipping to [-1, 1]) when there is none."""
    path = Path(directory) / SCHEDULER_CONFIG_NAME
    if not path.is_file():
        return noise_schedule()
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiverifyError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise DiverifyError(f"{path} must hold a JSON object")
    return noise_schedule_from_config(config)


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """A reverse chain: ``timesteps[i] -> prev_timesteps[i]``, i = 0 .. T-1 (t decreasing)."""

    kind: str  # "ddim" or "ddpm"
    noise: NoiseSchedule
    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    eta: float = 0.0
    final_alpha_cumprod: float = 1.0
    variance_type: str = "fixed_small"

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
    """diffusers' ``set_timesteps`` (decreasing integer timesteps)."""
    n, steps = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= steps <= n:
        raise DiverifyError(f"number of sampling steps must be in 1..{n}, got {num_inference_steps}")
    if spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise DiverifyError(f"timestep_spacing {spacing!r} is not supported (supported: {', '.join(SPACINGS)})")
    return ts


def ddim_schedule(noise: NoiseSchedule, num_inference_steps: int, eta: float = 0.0, spacing: str = "leading",
                  steps_offset: int = 0, set_alpha_to_one: bool = True) -> SamplingSchedule:
    """The DDIM chain of diffusers' ``DDIMScheduler`` with ``set_timesteps(num_inference_steps)``."""
    if eta < 0:
        raise DiverifyError(f"DDIM eta must be >= 0, got {eta}")
    ts = inference_timesteps(noise.num_train_timesteps, num_inference_steps, spacing, steps_offset)
    ratio = noise.num_train_timesteps // int(num_inference_steps)
    final = 1.0 if set_alpha_to_one else float(noise.alphas_cumprod[0])
    return SamplingSchedule("ddim", noise, tuple(int(t) for t in ts), tuple(int(t) - ratio for t in ts),
                            float(eta), final)


def ddpm_schedule(noise: NoiseSchedule, num_inference_steps: int | None = None, spacing: str = "leading",
                  steps_offset: int = 0, variance_type: str = "fixed_small") -> SamplingSchedule:
    """The ancestral chain of diffusers' ``DDPMScheduler`` (all N steps when ``num_inference_steps`` is None)."""
    if variance_type not in VARIANCE_TYPES:
        raise DiverifyError(f"DDPM variance_type {variance_type!r} is not supported "
                            f"(supported: {', '.join(VARIANCE_TYPES)})")
    steps = noise.num_train_timesteps if num_inference_steps is None else int(num_inference_steps)
    ts = inference_timesteps(noise.num_train_timesteps, steps, spacing, steps_offset)
    ratio = noise.num_train_timesteps // steps
    return SamplingSchedule("ddpm", noise, tuple(int(t) for t in ts), tuple(int(t) - ratio for t in ts),
                            1.0, 1.0, variance_type)


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    """x_prev = pred_x0_coeff * clip(x0) + sample_coeff * x_t + eps_coeff * eps + noise_std * z,
    x0 = (x_t - sqrt(1 - alpha_prod_t) eps) / sqrt(alpha_prod_t); ``clip_range`` None means no clipping.

    All numbers are float64 computed from the float32 abar table.
    """

    t: int
    t_prev: int
    alpha_prod_t: float
    alpha_prod_prev: float
    pred_x0_coeff: float
    sample_coeff: float
    eps_coeff: float
    noise_std: float
    clip_range: float | None


def _alpha(noise: NoiseSchedule, t: int, final: float) -> float:
    if t >= noise.num_train_timesteps:
        raise DiverifyError(f"timestep {t} is outside 0..{noise.num_train_timesteps - 1}")
    return float(noise.alphas_cumprod[t]) if t >= 0 else float(final)


def ddim_coefficients(noise: NoiseSchedule, t: int, t_prev: int, eta: float = 0.0,
                      final_alpha_cumprod: float = 1.0) -> StepCoefficients:
    """The DDIM step t -> t_prev (diffusers ``DDIMScheduler.step``, ``use_clipped_model_output=False``)."""
    a_t, a_prev = _alpha(noise, int(t), final_alpha_cumprod), _alpha(noise, int(t_prev), final_alpha_cumprod)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * math.sqrt(variance)
    return StepCoefficients(int(t), int(t_prev), a_t, a_prev, math.sqrt(a_prev), 0.0,
                            math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)), sigma,
                            noise.clip_sample_range if noise.clip_sample else None)


def ddpm_coefficients(noise: NoiseSchedule, t: int, t_prev: int,
                      variance_type: str = "fixed_small") -> StepCoefficients:
    """The ancestral step t -> t_prev (diffusers ``DDPMScheduler.step``)."""
    a_t, a_prev = _alpha(noise, int(t), 1.0), _alpha(noise, int(t_prev), 1.0)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    if variance_type == "fixed_small":
        variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    elif variance_type == "fixed_large":
        variance = beta_t
    else:
        raise DiverifyError(f"DDPM variance_type {variance_type!r} is not supported "
                            f"(supported: {', '.join(VARIANCE_TYPES)})")
    return StepCoefficients(int(t), int(t_prev), a_t, a_prev, math.sqrt(a_prev) * beta_t / (1 - a_t),
                            math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t), 0.0,
                            math.sqrt(variance) if t > 0 else 0.0,
                            noise.clip_sample_range if noise.clip_sample else None)


def apply_step(c: StepCoefficients, x_t: jax.Array, eps: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """Evaluate the step map of ``c`` (see :class:`StepCoefficients`); ``noise`` is z, ignored when sigma = 0."""
    x0 = (x_t - math.sqrt(1 - c.alpha_prod_t) * eps) / math.sqrt(c.alpha_prod_t)
    if c.clip_range is not None:
        x0 = jnp.clip(x0, -c.clip_range, c.clip_range)
    x_prev = c.pred_x0_coeff * x0
    if c.sample_coeff:
        x_prev = x_prev + c.sample_coeff * x_t
    if c.eps_coeff:
        x_prev = x_prev + c.eps_coeff * eps
    if c.noise_std:
        if noise is None:
            raise DiverifyError(f"the step at t={c.t} is stochastic (sigma={c.noise_std:.3g}): noise is required")
        x_prev = x_prev + c.noise_std * noise
    return x_prev


def ddim_step(noise: NoiseSchedule, x_t: jax.Array, eps: jax.Array, t: int, t_prev: int, eta: float = 0.0,
              z: jax.Array | None = None, final_alpha_cumprod: float = 1.0) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} given the eps-prediction (``z``: standard normal noise, needed if eta > 0)."""
    return apply_step(ddim_coefficients(noise, t, t_prev, eta, final_alpha_cumprod), x_t, eps, z)


def ddpm_step(noise: NoiseSchedule, x_t: jax.Array, eps: jax.Array, t: int, t_prev: int | None = None,
              z: jax.Array | None = None, variance_type: str = "fixed_small") -> jax.Array:
    """One ancestral DDPM step x_t -> x_{t_prev} (t_prev defaults to t - 1)."""
    return apply_step(ddpm_coefficients(noise, t, t - 1 if t_prev is None else t_prev, variance_type), x_t, eps, z)


def step_coefficients(schedule: SamplingSchedule, i: int) -> StepCoefficients:
    """The coefficients of step i (0 = first, from ``timesteps[0]``) of a sampling schedule."""
    if not 0 <= i < schedule.num_steps:
        raise DiverifyError(f"step index {i} is outside 0..{schedule.num_steps - 1}")
    t, t_prev = schedule.timesteps[i], schedule.prev_timesteps[i]
    if schedule.kind == "ddim":
        return ddim_coefficients(schedule.noise, t, t_prev, schedule.eta, schedule.final_alpha_cumprod)
    return ddpm_coefficients(schedule.noise, t, t_prev, schedule.variance_type)


def step_map(schedule: SamplingSchedule, i: int) -> Callable[..., jax.Array]:
    """The pure map ``(x_t, eps, z=None) -> x_prev`` of step i."""
    coeffs = step_coefficients(schedule, i)

    def step(x_t: jax.Array, eps: jax.Array, z: jax.Array | None = None) -> jax.Array:
        return apply_step(coeffs, x_t, eps, z)

    return step


def trajectory(apply_fn: Callable, params: Any, x_T: jax.Array, cond: Any, schedule: SamplingSchedule,
               key: jax.Array | None = None) -> list[jax.Array]:
    """All states [x_T, x_{t_1}, ..., x_0] of the reverse chain.

    ``apply_fn(params, x, t, cond)`` is the eps-prediction, called with
    ``t`` an int32 array of shape (batch,). ``key`` is required when a step is
    stochastic (DDPM, DDIM with eta > 0); step i uses ``fold_in(key, i)``.
    """
    model = jax.jit(apply_fn)
    states = [x_T]
    x = x_T
    batch = x_T.shape[0]
    for i in range(schedule.num_steps):
        coeffs = step_coefficients(schedule, i)
        eps = model(params, x, jnp.full((batch,), coeffs.t, jnp.int32), cond)
        z = None
        if coeffs.noise_std:
            if key is None:
                raise DiverifyError(f"the {schedule.kind} sampler with these settings is stochastic: a key is needed")
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x = apply_step(coeffs, x, eps, z)
        states.append(x)
    return states


def sample(apply_fn: Callable, params: Any, x_T: jax.Array, cond: Any, schedule: SamplingSchedule,
           key: jax.Array | None = None) -> jax.Array:
    """The end point x_0 of :func:`trajectory`."""
    return trajectory(apply_fn, params, x_T, cond, schedule, key)[-1]
