"""The digits denoiser: a short training run through the CLI, files diffusers can load, the classifier."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
import torch

from diverify.cli import main
from diverify.diffusion import digits
from diverify.diffusion.schedulers import read_noise_schedule
from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import load_denoiser


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train-denoiser", "--dataset", "digits", "--out", str(out), "--steps", "40",
                     "--samples-per-class", "2", "--ddim-steps", "3", "--json"])
    return out, code, buffer.getvalue()


def test_cli_prints_one_json_object_and_the_loss_decreases(short_run):
    out, code, text = short_run
    assert code == 0
    result = json.loads(text)
    assert result["dataset"] == "digits" and result["steps"] == 40
    assert result["loss_last"] < 0.7 * result["loss_first"]
    assert 0.0 <= result["sample_accuracy"] <= 1.0 and len(result["per_class_accuracy"]) == 10
    assert result["classifier_test_accuracy"] > 0.9


def test_saved_checkpoint_loads_in_diffusers_with_the_same_outputs(short_run):
    from diffusers import DDPMScheduler, UNet2DModel

    out, _, _ = short_run
    den = load_denoiser(out)
    model = UNet2DModel.from_pretrained(out).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([0, 400, 999]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        expected = model(x, t, class_labels=labels).sample.numpy()
    got = np.asarray(jax.jit(den.eps)(den.params, x.numpy(), t.numpy(), labels.numpy()))
    assert np.max(np.abs(got - expected)) <= 1e-4
    noise = read_noise_schedule(out)
    reference = DDPMScheduler.from_pretrained(out)
    np.testing.assert_allclose(noise.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5)
    assert noise.clip_sample == reference.config.clip_sample


def test_classifier_round_trip_and_accuracy(short_run):
    out, _, _ = short_run
    classifier = digits.load_classifier(out)
    images, labels = digits.load_digits_dataset()
    assert images.min() >= -1 and images.max() <= 1 and images.shape[1:] == (1, 8, 8)
    assert np.mean(classifier.predict(images) == labels) > 0.95


def test_bad_arguments_exit_with_a_one_line_error(tmp_path, capsys):
    assert main(["train-denoiser", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["train-denoiser", "--out", str(tmp_path / "file"), "--steps", "5"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(DiverifyError, match="does not exist"):
        digits.load_classifier(tmp_path)
