"""Denoiser DIS: the path-KL estimator against a linear-Gaussian chain with a closed-form KL, the planted
denoiser backdoor (quick build) against its clean twin, and the errors."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.backdoors import denoiser as backdoor
from diverify.diffusion.schedulers import ddpm_schedule, noise_schedule, step_coefficients
from diverify.dis import DISResult
from diverify.dis.denoiser import denoiser_dis, dis_from_path_kl, path_kl, path_stds
from diverify.errors import DiverifyError
from diverify.results import dumps

SHAPE = (1, 4, 4)


def linear_eps(params, x, t, cond):
    """eps = (a + w.u) x + w @ V: every step of the ancestral chain is affine with a scalar gain."""
    gain = params["a"] + cond @ params["u"]
    return gain[:, None, None, None] * x + (cond @ params["V"]).reshape(x.shape)


def exact_path_kl(params, w, w_perturbed, schedule):
    """Closed form: x_i ~ N(m_i, v_i I) under w; mu(x, w) = A(w) x + B(w) per step."""
    stds = path_stds(schedule)
    d = int(np.prod(SHAPE))
    m, v, total, outputs = np.zeros(d), 1.0, 0.0, []
    for i in range(schedule.num_steps):
        c = step_coefficients(schedule, i)
        s0, s1 = math.sqrt(c.alpha_prod_t), math.sqrt(1 - c.alpha_prod_t)

        def affine(weights):
            gain = params["a"] + weights @ params["u"]
            return (c.pred_x0_coeff * (1 - s1 * gain) / s0 + c.sample_coeff,
                    -c.pred_x0_coeff * s1 * (weights @ params["V"]) / s0)

        (a0, b0), (a1, b1) = affine(w), affine(w_perturbed)
        total += (np.sum(((a0 - a1) * m + (b0 - b1)) ** 2) + (a0 - a1) ** 2 * d * v) / (2 * stds[i] ** 2)
        outputs.append((a1 * m + b1, a1 ** 2 * v + stds[i] ** 2))
        m, v = a0 * m + b0, a0 ** 2 * v + stds[i] ** 2
    return total, (m, v), outputs[-1]


@pytest.fixture(scope="module")
def linear_model():
    rng = np.random.default_rng(0)
    params = {"a": np.float64(0.3), "u": rng.normal(0, 0.2, 3), "V": rng.normal(0, 0.3, (3, int(np.prod(SHAPE))))}
    schedule = ddpm_schedule(noise_schedule(clip_sample=False), 20)
    return params, schedule


def estimate(params, w, w_perturbed, schedule, n, seed=0):
    key = jax.random.PRNGKey(seed)
    x_T = jax.random.normal(jax.random.fold_in(key, 99), (n,) + SHAPE, jnp.float32)
    tiled = np.tile(w, (n, 1)).astype(np.float32), np.tile(w_perturbed, (n, 1)).astype(np.float32)
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return path_kl(linear_eps, jparams, *tiled, schedule, x_T, key)


def test_path_kl_confidence_interval_covers_the_closed_form(linear_model):
    params, schedule = linear_model
    w, w_perturbed = np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.05])
    exact, _, _ = exact_path_kl(params, w, w_perturbed, schedule)
    kl = estimate(params, w, w_perturbed, schedule, 400)
    mean, lo, hi = kl.interval()
    assert lo <= exact <= hi, (lo, exact, hi)
    assert hi - lo < 0.2 * exact  # an interval wide enough to cover anything would not test the estimator
    assert kl.per_step.shape == (schedule.num_steps,) and np.all(kl.per_step >= 0)


def test_additive_shift_is_exact_and_bounds_the_output_kl(linear_model):
    params, schedule = linear_model
    w, w_perturbed = np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.3, 0.0])
    params = {**params, "u": np.zeros(3)}  # the gain no longer depends on w: Delta mu is constant
    exact, (m, v), (m_p, v_p) = exact_path_kl(params, w, w_perturbed, schedule)
    kl = estimate(params, w, w_perturbed, schedule, 8)
    np.testing.assert_allclose(kl.per_sample, exact, rtol=2e-3)
    # Both outputs are Gaussian with the same variance: their KL is the data-processed one, below the path KL.
    assert v == pytest.approx(v_p)
    output_kl = float(np.sum((m - m_p) ** 2) / (2 * v))
    assert 0 < output_kl <= exact


def test_dis_result_fields_and_errors(linear_model):
    params, schedule = linear_model
    kl = estimate(params, np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.05]), schedule, 16)
    result = dis_from_path_kl(kl, 0.5, model_kind="denoiser", perturbation="random:0.5", seconds=0.0)
    assert isinstance(result, DISResult)
    assert result.dis == pytest.approx(math.sqrt(2 * result.kl) / 0.5)
    assert result.ci[0] <= result.dis <= result.ci[1] and result.kl_ratio == pytest.approx(result.kl / 0.5)
    assert set(json.loads(dumps(result))) >= {"dis", "ci", "kl", "dist", "kl_ratio"}
    with pytest.raises(DiverifyError, match="nonzero finite dist"):
        dis_from_path_kl(kl, 0.0, model_kind="denoiser", perturbation="x", seconds=0.0)
    with pytest.raises(DiverifyError, match="ancestral"):
        path_stds(dataclasses.replace(schedule, kind="ddim"))


def test_resolution_stops_the_path_before_the_sharp_steps(linear_model):
    params, schedule = linear_model
    w, w_perturbed = np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.05])
    stds = path_stds(schedule)
    full = estimate(params, w, w_perturbed, schedule, 16)
    key = jax.random.PRNGKey(0)
    x_T = jax.random.normal(jax.random.fold_in(key, 99), (16,) + SHAPE, jnp.float32)
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    tiled = np.tile(w, (16, 1)).astype(np.float32), np.tile(w_perturbed, (16, 1)).astype(np.float32)
    cut = path_kl(linear_eps, jparams, *tiled, schedule, x_T, key, resolution=0.05)
    assert cut.per_step.size == int(np.sum(stds >= 0.05)) < schedule.num_steps
    np.testing.assert_allclose(cut.per_step, full.per_step[:cut.per_step.size], rtol=1e-5)
    with pytest.raises(DiverifyError, match="above the std of every sampler step"):
        path_kl(linear_eps, jparams, *tiled, schedule, x_T, key, resolution=2.0)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("denoiser-backdoor")
    return out, backdoor.build_denoiser_backdoor(out, seed=0, trigger="cond", quick=True)


def test_quick_fixture_files_and_summary(fixture):
    out, summary = fixture
    assert json.loads((out / "fixture.json").read_text()) == json.loads(json.dumps(summary))
    for role in ("backdoored", "clean"):
        info = json.loads((out / role / "fixture.json").read_text())
        assert info["role"] == role and info["trigger_row"] == backdoor.TRIGGER_ROW
        assert (out / role / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / role / "classifier.json").is_file()
    assert (out / "base" / "diffusion_pytorch_model.safetensors").is_file()
    assert summary["quick"] and summary["target_class"] == backdoor.TARGET_CLASS


def test_trigger_moves_the_backdoored_model_and_not_the_clean_twin(fixture):
    out, summary = fixture
    models = summary["models"]
    assert models["backdoored"]["trigger_success"] >= models["clean"]["trigger_success"] + 0.1
    backdoored = denoiser_dis(out / "backdoored", "3", "trigger", samples=8, steps=20)
    clean = denoiser_dis(out / "clean", "3", "trigger", samples=8, steps=20)
    assert backdoored.dist == pytest.approx(backdoor.TRIGGER_NORM, rel=1e-5)
    assert backdoored.ci[0] > clean.ci[1], (backdoored.ci, clean.ci)


def test_denoiser_dis_errors(fixture, tmp_path):
    out, _ = fixture
    model = out / "clean"
    with pytest.raises(DiverifyError, match="outside the class-embedding table"):
        denoiser_dis(model, "11", "random", samples=4, steps=2)
    with pytest.raises(DiverifyError, match="integer class-embedding row"):
        denoiser_dis(model, "three", "random", samples=4, steps=2)
    with pytest.raises(DiverifyError, match="unknown perturbation"):
        denoiser_dis(model, "3", "blur", samples=4, steps=2)
    with pytest.raises(DiverifyError, match="prompt's own row"):
        denoiser_dis(model, "3", "trigger:3", samples=4, steps=2)
    with pytest.raises(DiverifyError, match="positive finite R"):
        denoiser_dis(model, "3", "random:0", samples=4, steps=2)
    with pytest.raises(DiverifyError, match="at least 2"):
        denoiser_dis(model, "3", "random", samples=1, steps=2)
    with pytest.raises(DiverifyError, match="does not exist"):
        denoiser_dis(tmp_path / "missing", "3", "random")
    with pytest.raises(DiverifyError, match="trigger must be one of"):
        backdoor.build_denoiser_backdoor(tmp_path, trigger="weights", quick=True)


def test_cli_builds_a_quick_denoiser_fixture_and_prints_its_table(tmp_path, capsys):
    from diverify import cli

    assert cli.main(["backdoor", "build", "--kind", "denoiser-xt", "--out", str(tmp_path / "xt"), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "clean sample accuracy" in out and "target class 7" in out
    summary = json.loads((tmp_path / "xt" / "fixture.json").read_text())
    assert summary["trigger"] == "xt" and (tmp_path / "xt" / "trigger.npy").is_file()
    assert (tmp_path / "xt" / "base" / "config.json").is_file()
