"""Loading errors for diffusers checkpoints: each names the user's file, tensor or option."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import (CONFIG_NAME, WEIGHTS_NAME, build_denoiser, load_denoiser,
                                                  save_denoiser)

CONFIG = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
          "block_out_channels": [4, 8], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
          "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 2,
          "num_class_embeds": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unet")
    den = build_denoiser(CONFIG)
    save_denoiser(directory, CONFIG, den.params)
    return directory


def copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def rewrite_weights(directory, edit):
    tensors = load_file(str(directory / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))


def test_round_trip_keeps_every_tensor(checkpoint):
    den = load_denoiser(checkpoint)
    again = build_denoiser(CONFIG)
    assert den.class_name == "UNet2DModel" and den.sample_size == 8
    loaded, original = jax.tree_util.tree_leaves_with_path(den.params), jax.tree_util.tree_leaves_with_path(again.params)
    assert [p for p, _ in loaded] == [p for p, _ in original]
    for (path, a), (_, b) in zip(loaded, original):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_missing_directory_config_and_weights(tmp_path, checkpoint):
    with pytest.raises(DiverifyError, match="does not exist"):
        load_denoiser(tmp_path / "nope")
    with pytest.raises(DiverifyError, match="has no config.json"):
        load_denoiser(tmp_path)
    target = copy(checkpoint, tmp_path)
    (target / WEIGHTS_NAME).unlink()
    with pytest.raises(DiverifyError, match=f"has no {WEIGHTS_NAME}"):
        load_denoiser(target)


def test_bad_json_and_truncated_weights(tmp_path, checkpoint):
    target = copy(checkpoint, tmp_path)
    data = (target / WEIGHTS_NAME).read_bytes()
    (target / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(DiverifyError, match="truncated or corrupt"):
        load_denoiser(target)
    (target / CONFIG_NAME).write_text("{not json")
    with pytest.raises(DiverifyError, match="not valid JSON"):
        load_denoiser(target)


@pytest.mark.parametrize("change,message", [
    ({"_class_name": "UNet3DConditionModel"}, "_class_name 'UNet3DConditionModel' is not supported"),
    ({"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}, "down block type 'SkipDownBlock2D'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"block_out_channels": [4]}, "as many down_block_types"),
    ({"attention_head_dim": 3}, "attention_head_dim=3 must divide"),
])
def test_unsupported_config_options(tmp_path, checkpoint, change, message):
    target = copy(checkpoint, tmp_path)
    (target / CONFIG_NAME).write_text(json.dumps(dict(CONFIG, **change)))
    with pytest.raises(DiverifyError, match=message):
        load_denoiser(target)


def test_dit_and_condition_options_are_checked():
    with pytest.raises(DiverifyError, match="norm_type='ada_norm_single'"):
        build_denoiser({"_class_name": "DiTTransformer2DModel", "norm_type": "ada_norm_single"})
    with pytest.raises(DiverifyError, match="addition_embed_type='text_time'"):
        build_denoiser({"_class_name": "UNet2DConditionModel", "block_out_channels": [8],
                        "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
                        "norm_num_groups": 4, "addition_embed_type": "text_time"})
    with pytest.raises(DiverifyError, match="num_class_embeds=10"):
        build_denoiser({"_class_name": "UNet2DConditionModel", "block_out_channels": [8],
                        "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
                        "norm_num_groups": 4, "num_class_embeds": 10})


def test_wrong_conditioning_is_named(checkpoint):
    den = load_denoiser(checkpoint)
    x, t = np.zeros((2, 1, 8, 8), np.float32), np.array([1, 2])
    with pytest.raises(DiverifyError, match=r"class labels must have shape \(2,\) or \(2, 3\)"):
        den.apply(den.params, x, t, np.zeros((2, 5), np.float32))
    with pytest.raises(DiverifyError, match="NCHW with 1 channels"):
        den.apply(den.params, np.zeros((2, 3, 8, 8), np.float32), t, np.array([0, 1]))
    unconditional = build_denoiser(dict(CONFIG, num_class_embeds=None))
    with pytest.raises(DiverifyError, match="pass no class labels"):
        unconditional.apply(unconditional.params, x, t, np.array([0, 1]))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("down_blocks.1.attentions.0.to_q.weight"), "missing tensor 'down_blocks.1.attentions.0.to_q.weight'"),
    (lambda t: t.update({"conv_in.weight": np.zeros((4, 1, 5, 5), np.float32)}), "tensor 'conv_in.weight'.*shape"),
    (lambda t: t["class_embedding.weight"].__setitem__((0, 0), np.nan), "'class_embedding.weight'.*NaN"),
    (lambda t: t["conv_out.bias"].__setitem__(0, np.inf), "'conv_out.bias'.*Inf"),
    (lambda t: t.update({"extra.weight": np.zeros(3, np.float32)}), "'extra.weight' that the config does not use"),
])
def test_bad_tensors_are_named(tmp_path, checkpoint, edit, message):
    target = copy(checkpoint, tmp_path)
    rewrite_weights(target, edit)
    with pytest.raises(DiverifyError, match=message):
        load_denoiser(target)
