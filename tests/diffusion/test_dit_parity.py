"""Flax DiTTransformer2DModel against diffusers (random small class-conditional configs)."""

import jax
import numpy as np
import pytest
import torch

from diffusers import DiTTransformer2DModel

from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import load_denoiser
from tests.precision import low_precision_products


@pytest.mark.parametrize("out_channels,activation", [(None, "gelu-approximate"), (8, "gelu")])
def test_dit_matches_diffusers(tmp_path, out_channels, activation):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=out_channels, num_layers=2, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10, activation_fn=activation)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # adaLN-zero starts at zero; make every weight matter
    model.eval().save_pretrained(tmp_path, safe_serialization=True)
    den = load_denoiser(tmp_path)
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10, 999]), torch.tensor([3, 9])
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=labels).sample.numpy()
    got = np.asarray(jax.jit(den.apply)(den.params, x.numpy(), t.numpy(), labels.numpy()))
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4
    eps = np.asarray(den.eps(den.params, x.numpy(), t.numpy(), labels.numpy()))
    np.testing.assert_allclose(eps, got[:, :4], atol=1e-5)
    jaxpr = jax.make_jaxpr(den.eps)(den.params, x.numpy(), t.numpy(), labels.numpy())
    assert jaxpr.out_avals[0].shape == (2, 4, 8, 8)
    assert low_precision_products(den.eps, den.params, x.numpy(), t.numpy(), labels.numpy()) == []
    with pytest.raises(DiverifyError, match="input must have shape"):
        den.apply(den.params, np.zeros((2, 4, 6, 6), np.float32), t.numpy(), labels.numpy())
