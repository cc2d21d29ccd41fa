"""Shared helpers: copies of the tiny-bert fixture with chosen changes."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import TINY_BERT

TINY = str(TINY_BERT)


@pytest.fixture(scope="session")
def tiny_tensors():
    return load_file(f"{TINY}/model.safetensors")


@pytest.fixture
def make_model(tmp_path, tiny_tensors):
    """``make_model(name, changes={tensor: array}, drop=(), config_changes={})`` -> checkpoint dir."""

    def make(name, changes=None, drop=(), config_changes=None):
        path = tmp_path / name
        path.mkdir()
        tensors = {k: v for k, v in tiny_tensors.items() if k not in drop}
        tensors.update(changes or {})
        save_file(tensors, str(path / "model.safetensors"))
        config = json.loads(open(f"{TINY}/config.json").read())
        config.update(config_changes or {})
        (path / "config.json").write_text(json.dumps(config))
        return path

    return make


@pytest.fixture
def make_adapter(tmp_path):
    """``make_adapter(name, factors={module: (A, B)}, r, alpha, rslora)`` -> PEFT adapter dir."""

    def make(name, factors, r, alpha, rslora=False):
        path = tmp_path / name
        path.mkdir()
        config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
                  "target_modules": sorted({m.split(".")[-1] for m in factors})}
        (path / "adapter_config.json").write_text(json.dumps(config))
        tensors = {}
        for module, (a, b) in factors.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(a, np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(b, np.float32)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path

    return make
