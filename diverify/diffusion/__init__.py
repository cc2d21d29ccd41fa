"""Diffusion sampling: noise schedules, DDPM/DDIM step maps and samplers, exact-score fixtures.

The schedulers are pure maps x_t -> x_{t_prev} (:mod:`diverify.diffusion.schedulers`);
:mod:`diverify.diffusion.gmm` is a Gaussian mixture whose exact eps-prediction
plays the denoiser; :mod:`diverify.diffusion.digits` trains a real one.
"""

from diverify.diffusion.schedulers import (NoiseSchedule, SamplingSchedule, StepCoefficients, apply_step,
                                           ddim_schedule, ddim_step, ddpm_schedule, ddpm_step, noise_schedule,
                                           noise_schedule_from_config, read_noise_schedule, sample,
                                           step_coefficients, step_map, trajectory)

__all__ = ["NoiseSchedule", "SamplingSchedule", "StepCoefficients", "apply_step", "ddim_schedule", "ddim_step",
           "ddpm_schedule", "ddpm_step", "noise_schedule", "noise_schedule_from_config",
           "read_noise_schedule", "sample", "step_coefficients", "step_map", "trajectory"]
