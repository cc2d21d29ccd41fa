"""``diverify cws --denoiser``: class and image predicates on a random-weight digits UNet."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.cli import main
from diverify.cws import predicates
from diverify.diffusion import digits
from diverify.diffusion.schedulers import ddim_schedule, noise_schedule_from_config, sample
from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import build_denoiser, load_denoiser, save_denoiser

STEPS = 2
#: The certificate keys the text mode reports too.
KEYS = ("p_hat", "p_upper", "n", "k", "sigma", "alpha", "p_max", "certified_edit_radius", "covered_edit_fro_norm",
        "params", "num_perturbed_params", "samples_per_second", "seconds", "model", "model_hash", "predicate",
        "target", "devices", "processes")


@pytest.fixture(scope="module")
def denoiser_dir(tmp_path_factory):
    """The digits UNet with random weights, its scheduler and a random linear classifier."""
    d = tmp_path_factory.mktemp("digits-random")
    save_denoiser(d, digits.UNET_CONFIG, build_denoiser(digits.UNET_CONFIG, seed=0).params)
    (d / digits.SCHEDULER_NAME).write_text(json.dumps(digits.SCHEDULER_CONFIG))
    rng = np.random.default_rng(0)
    digits.save_classifier(d, digits.DigitsClassifier(rng.standard_normal((10, 64)).astype(np.float32),
                                                      np.zeros(10, np.float32), float("nan")))
    return d


@pytest.fixture(scope="module")
def clean(denoiser_dir):
    """The clean sample (condition: class 3, noise seed 0) and its class."""
    den = load_denoiser(denoiser_dir)
    schedule = ddim_schedule(noise_schedule_from_config(digits.SCHEDULER_CONFIG), STEPS)
    x_T = jnp.asarray(predicates.initial_noise(den, 0))
    fn = predicates.denoiser_sample_fn(den, x_T, jnp.asarray(predicates.class_condition(den, [3])), schedule)
    x0 = np.asarray(jax.jit(fn)(den.params))
    # one-hot class weights condition exactly like the integer label
    np.testing.assert_allclose(x0, sample(den.eps, den.params, x_T, jnp.asarray([3]), schedule), atol=1e-5)
    return x0, int(digits.load_classifier(denoiser_dir).predict(x0)[0])


def run_json(argv, capsys):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_class_predicate_holds_under_tiny_noise_and_not_for_another_class(denoiser_dir, clean, capsys):
    _, clean_class = clean
    argv = ["cws", "--denoiser", str(denoiser_dir), "--condition", "3", "--steps", str(STEPS),
            "--sigma", "1e-6", "--samples", "8", "--batch", "8", "--alpha", "0.01"]
    out = run_json(argv + ["--target-class", str(clean_class)], capsys)
    for key in KEYS:
        assert key in out
    assert out["k"] == out["n"] == 8 and out["clean_class"] == clean_class and out["condition"] == [3]
    assert out["num_perturbed_params"] == sum(np.size(p) for p in jax.tree_util.tree_leaves(
        load_denoiser(denoiser_dir).params))
    assert out["certified_edit_radius"] == 0.0  # the predicate always holds: nothing to certify
    out = run_json(argv + ["--target-class", str((clean_class + 1) % 10)], capsys)
    assert out["k"] == 0 and out["certified_edit_radius"] > 0


def test_cli_image_predicate_and_human_report(denoiser_dir, clean, tmp_path, capsys):
    x0, _ = clean
    np.save(tmp_path / "near.npy", x0[0])
    np.save(tmp_path / "far.npy", x0[0] + 1.0)  # l2 distance 8 from the clean sample
    argv = ["cws", "--denoiser", str(denoiser_dir), "--condition", "3", "--steps", str(STEPS), "--sigma", "1e-6",
            "--samples", "8", "--batch", "8", "--alpha", "0.01", "--sampler", "explicit", "--params", "up_blocks*"]
    out = run_json(argv + ["--target-image", str(tmp_path / "near.npy"), "--radius", "1e-3"], capsys)
    assert out["k"] == 8 and out["clean_distance"] < 1e-5 and out["sampler"] == "explicit"
    assert main(argv + ["--target-image", str(tmp_path / "far.npy"), "--radius", "1"]) == 0
    text = capsys.readouterr().out
    assert "samples n / hits k                   8 / 0" in text and "distance 8" in text


def test_cli_xt_trigger_adds_its_pattern_to_the_initial_noise(denoiser_dir, clean, tmp_path, capsys):
    """--xt-trigger samples from x_T + r: the reported clean distance is that sample's."""
    x0, _ = clean
    r = np.full((1, 8, 8), 2.0, np.float32)
    np.save(tmp_path / "near.npy", x0[0])
    np.save(tmp_path / "r.npy", r)
    argv = ["cws", "--denoiser", str(denoiser_dir), "--condition", "3", "--steps", str(STEPS), "--sigma", "1e-6",
            "--samples", "4", "--batch", "4", "--alpha", "0.01", "--target-image", str(tmp_path / "near.npy"),
            "--radius", "1e-3"]
    out = run_json(argv, capsys)
    assert out["k"] == 4 and out["xt_trigger"] is None
    out = run_json(argv + ["--xt-trigger", str(tmp_path / "r.npy")], capsys)
    den = load_denoiser(denoiser_dir)
    schedule = ddim_schedule(noise_schedule_from_config(digits.SCHEDULER_CONFIG), STEPS)
    x_T = jnp.asarray(predicates.initial_noise(den, 0)) + r
    shifted = predicates.denoiser_sample_fn(den, x_T, jnp.asarray(predicates.class_condition(den, [3])), schedule)
    distance = float(np.linalg.norm(np.asarray(jax.jit(shifted)(den.params)) - x0))
    assert out["xt_trigger"] == str(tmp_path / "r.npy") and out["k"] == 0
    assert out["clean_distance"] == pytest.approx(distance, rel=1e-4) and distance > 1e-2


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one of --target-class"),
    (["--target-class", "1", "--target-image", "x.npy", "--radius", "1"], "exactly one of --target-class"),
    (["--target-class", "1", "--radius", "1"], "--radius goes with --target-image"),
    (["--target-class", "1", "--prompt", "a cat"], "--prompt do(es) not apply to denoisers"),
    (["--target-class", "12"], "not a class of the classifier"),
    (["--target-class", "1", "--condition", "3,10"], "outside the class-embedding table"),
    (["--target-image", "missing.npy", "--radius", "1"], "not a readable .npy"),
    (["--target-class", "1", "--xt-trigger", "missing.npy"], "--xt-trigger 'missing.npy' is not a readable .npy"),
])
def test_cli_denoiser_errors_are_one_line(denoiser_dir, extra, message, capsys):
    argv = ["cws", "--denoiser", str(denoiser_dir), "--condition", "3", "--sigma", "0.1", "--samples", "4"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_class_condition_checks(denoiser_dir):
    den = load_denoiser(denoiser_dir)
    np.testing.assert_array_equal(predicates.class_condition(den, [3, 3]), 2 * np.eye(10, dtype=np.float32)[[3]])
    with pytest.raises(DiverifyError, match="class-conditional: give --condition"):
        predicates.class_condition(den, None)
    uncond = build_denoiser({**digits.UNET_CONFIG, "num_class_embeds": None})
    assert predicates.class_condition(uncond, None) is None
    with pytest.raises(DiverifyError, match="omit --condition"):
        predicates.class_condition(uncond, [1])


def test_text_mode_needs_its_options(capsys):
    assert main(["cws", "--prompt", "a cat", "--sigma", "0.1"]) == 2
    assert "--trigger, --target required" in capsys.readouterr().err
