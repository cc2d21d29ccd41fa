"""Flax UNet2DModel / UNet2DConditionModel against diffusers' PyTorch models (random small configs)."""

import jax
import numpy as np
import pytest
import torch

from diffusers import UNet2DConditionModel, UNet2DModel

from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import load_denoiser
from tests.precision import low_precision_products

UNET2D_CONFIGS = {
    "attention": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      layers_per_block=1, norm_num_groups=4, attention_head_dim=4),
    "class_conditional_no_attention": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, layers_per_block=2,
        norm_num_groups=4, num_class_embeds=10, add_attention=False, downsample_padding=0, freq_shift=1,
        flip_sin_to_cos=False),
    "class_conditional_attention": dict(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 8),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=2, num_class_embeds=3, attention_head_dim=None,
        mid_block_scale_factor=1.4142, center_input_sample=True),
}


def perturbed(model):
    """diffusers zero-initialises some output layers; random offsets make every weight matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", sorted(UNET2D_CONFIGS))
def test_unet2d_matches_diffusers(tmp_path, name):
    config = UNET2D_CONFIGS[name]
    torch.manual_seed(0)
    model = perturbed(UNet2DModel(**config))
    model.save_pretrained(tmp_path, safe_serialization=True)
    den = load_denoiser(tmp_path)
    size = config["sample_size"]
    x = torch.randn(2, config["in_channels"], size, size)
    t = torch.tensor([3, 871])
    labels = torch.tensor([1, 2]) if "num_class_embeds" in config else None
    with torch.no_grad():
        expected = model(x, t, class_labels=labels).sample.numpy()
    got = np.asarray(den.apply(den.params, x.numpy(), t.numpy(), None if labels is None else labels.numpy()))
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4
    assert low_precision_products(den.eps, den.params, x.numpy(), t.numpy(),
                                  None if labels is None else labels.numpy()) == []
    if labels is not None:
        one_hot = np.eye(config["num_class_embeds"], dtype=np.float32)[labels.numpy()]
        soft = np.asarray(den.apply(den.params, x.numpy(), t.numpy(), one_hot))
        assert np.max(np.abs(soft - expected)) <= 1e-4
        # The bound engine walks the jaxpr: tracing must not need concrete values.
        jaxpr = jax.make_jaxpr(den.eps)(den.params, x.numpy(), t.numpy(), one_hot)
        assert any(eqn.primitive.name == "conv_general_dilated" for eqn in jaxpr.jaxpr.eqns)
        with pytest.raises(DiverifyError, match="class labels are required"):
            den.apply(den.params, x.numpy(), t.numpy(), None)
        with pytest.raises(DiverifyError, match="multiples of"):
            den.apply(den.params, np.zeros((1, config["in_channels"], 7, 8), np.float32), t.numpy(), labels.numpy())


@pytest.mark.parametrize("linear_projection", [False, True])
def test_unet2d_condition_matches_diffusers(tmp_path, linear_projection):
    torch.manual_seed(1)
    model = perturbed(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        use_linear_projection=linear_projection))
    model.save_pretrained(tmp_path, safe_serialization=True)
    den = load_denoiser(tmp_path)
    x, states = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=states).sample.numpy()
    got = np.asarray(den.apply(den.params, x.numpy(), t.numpy(), states.numpy()))
    assert np.max(np.abs(got - expected)) <= 1e-4
    assert low_precision_products(den.eps, den.params, x.numpy(), t.numpy(), states.numpy()) == []
    with pytest.raises(DiverifyError, match="encoder hidden states"):
        den.apply(den.params, x.numpy(), t.numpy(), None)
