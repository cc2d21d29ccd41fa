"""DDPM/DDIM step maps against diffusers' DDPMScheduler.step and DDIMScheduler.step."""

import numpy as np
import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler

from diverify.diffusion import schedulers as sch
from diverify.errors import DiverifyError

SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]


@pytest.mark.parametrize("kind,start,end", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(kind, start, end):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind)
    ours = sch.noise_schedule(1000, start, end, kind)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("steps,offset,spacing", [(10, 0, "leading"), (25, 1, "leading"), (7, 0, "trailing"),
                                                  (50, 0, "linspace")])
def test_ddim_timesteps_match_diffusers(steps, offset, spacing):
    ref = DDIMScheduler(num_train_timesteps=1000, steps_offset=offset, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = sch.ddim_schedule(sch.noise_schedule(), steps, spacing=spacing, steps_offset=offset)
    assert list(ours.timesteps) == ref.timesteps.tolist()


def _sample_and_eps(seed, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5, torch.randn(shape, generator=g)


@pytest.mark.parametrize("kind,start,end", SCHEDULES)
@pytest.mark.parametrize("eta,set_alpha_to_one,offset,clip", [(0.0, True, 0, True), (0.0, False, 1, False),
                                                               (0.7, True, 0, True), (1.0, False, 1, False)])
def test_ddim_step_matches_diffusers(kind, start, end, eta, set_alpha_to_one, offset, clip):
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind,
                        set_alpha_to_one=set_alpha_to_one, steps_offset=offset, clip_sample=clip)
    ref.set_timesteps(10)
    ours = sch.ddim_schedule(sch.noise_schedule(1000, start, end, kind, clip_sample=clip), 10, eta=eta,
                             steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
    assert list(ours.timesteps) == ref.timesteps.tolist()
    for i in (0, 4, 9):
        x, eps = _sample_and_eps(i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        t = int(ref.timesteps[i])
        expected = ref.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample.numpy()
        got = sch.step_map(ours, i)(x.numpy(), eps.numpy(), z.numpy())
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)
        direct = sch.ddim_step(ours.noise, x.numpy(), eps.numpy(), t, ours.prev_timesteps[i], eta, z.numpy(),
                               ours.final_alpha_cumprod)
        np.testing.assert_allclose(np.asarray(direct), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,start,end", SCHEDULES)
@pytest.mark.parametrize("steps,variance_type", [(None, "fixed_small"), (20, "fixed_small"), (20, "fixed_large")])
def test_ddpm_step_matches_diffusers(kind, start, end, steps, variance_type):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind,
                        variance_type=variance_type)
    if steps is not None:
        ref.set_timesteps(steps)
    ours = sch.ddpm_schedule(sch.noise_schedule(1000, start, end, kind), steps, variance_type=variance_type)
    assert list(ours.timesteps) == ref.timesteps.tolist()
    for i in (0, len(ours.timesteps) // 2, len(ours.timesteps) - 1):
        x, eps = _sample_and_eps(i)
        t = int(ref.timesteps[i])
        # diffusers draws its noise with randn_tensor(shape, generator): the same seed gives the same z.
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample.numpy()
        got = sch.step_map(ours, i)(x.numpy(), eps.numpy(), z.numpy())
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def test_unclipped_step_is_the_affine_map_of_its_coefficients():
    noise = sch.noise_schedule(clip_sample=False)
    sched = sch.ddim_schedule(noise, 10, eta=0.5)
    c = sch.step_coefficients(sched, 3)
    x, eps = (np.random.default_rng(0).normal(size=(5, 7)) for _ in range(2))
    z = np.random.default_rng(1).normal(size=(5, 7))
    x_coeff = c.pred_x0_coeff / np.sqrt(c.alpha_prod_t) + c.sample_coeff
    eps_coeff = c.eps_coeff - c.pred_x0_coeff * np.sqrt(1 - c.alpha_prod_t) / np.sqrt(c.alpha_prod_t)
    np.testing.assert_allclose(np.asarray(sch.step_map(sched, 3)(x, eps, z)),
                               x_coeff * x + eps_coeff * eps + c.noise_std * z, rtol=1e-6, atol=1e-6)


def test_sampler_runs_the_step_maps_in_order():
    noise = sch.noise_schedule(clip_sample=False)
    sched = sch.ddim_schedule(noise, 5)
    seen = []

    def eps_fn(params, x, t, cond):
        return 0.1 * x + params

    x_T = np.ones((2, 3), np.float32)
    states = sch.trajectory(eps_fn, 0.5, x_T, None, sched)
    expected = x_T
    for i in range(sched.num_steps):
        expected = sch.step_map(sched, i)(expected, 0.1 * expected + 0.5)
        seen.append(expected)
    np.testing.assert_allclose(np.asarray(states[-1]), np.asarray(expected), rtol=1e-6)
    assert len(states) == sched.num_steps + 1


def test_stochastic_steps_need_noise_and_bad_options_raise():
    noise = sch.noise_schedule()
    with pytest.raises(DiverifyError, match="noise is required"):
        sch.step_map(sch.ddpm_schedule(noise, 10), 0)(np.zeros(3), np.zeros(3))
    with pytest.raises(DiverifyError, match="key is needed"):
        sch.sample(lambda p, x, t, c: x, None, np.zeros((1, 3)), None, sch.ddim_schedule(noise, 4, eta=1.0))
    with pytest.raises(DiverifyError, match="beta_schedule"):
        sch.noise_schedule(beta_schedule="sigmoid")
    with pytest.raises(DiverifyError, match="sampling steps"):
        sch.ddim_schedule(noise, 0)
    with pytest.raises(DiverifyError, match="step index"):
        sch.step_map(sch.ddim_schedule(noise, 4), 4)
