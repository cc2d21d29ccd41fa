"""Hugging Face checkpoint directories as Flax parameters: ``config.json`` and the name mapping.

The safetensors weights themselves are read by :mod:`diverify.safetensors_io`.

:func:`torch_key` is the whole Flax -> PyTorch name mapping of the text
encoders: module paths are the checkpoint's names with list indices written
``layer_3`` instead of ``layer.3``; leaves ``kernel`` (transposed),
``scale`` and ``embedding`` are the checkpoint's ``weight``.

Every problem with the user's files raises :class:`DiverifyError` with one
line naming the file or tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError
from diverify.safetensors_io import CONFIG_NAME, TensorInfo, load_float_tensor, read_json


def model_directory(directory: str | Path) -> Path:
    """``directory`` as a Path; DiverifyError if it does not exist or is not a directory."""
    path = Path(directory).expanduser()
    if not path.exists():
        raise DiverifyError(f"model directory {str(directory)!r} does not exist")
    if not path.is_dir():
        raise DiverifyError(f"model path {str(directory)!r} is not a directory")
    return path


def read_config(directory: str | Path) -> dict:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = model_directory(directory) / CONFIG_NAME
    if not path.is_file():
        raise DiverifyError(f"no {CONFIG_NAME} in model directory {str(directory)!r}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise DiverifyError(f"{path} does not hold a JSON object")
    return config


def torch_key(path: Iterable[str]) -> str:
    """The PyTorch state-dict name of the Flax parameter at ``path`` (the one name mapping).

    ``('encoder', 'layer_3', 'attention', 'self', 'query', 'kernel')`` ->
    ``'encoder.layer.3.attention.self.query.weight'``.
    """
    *modules, leaf = path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(names + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def _candidates(key: str, aliases: Iterable[tuple[str, str]]) -> list[str]:
    return [new + key[len(old):] for old, new in aliases if key.startswith(old)]


def load_params(template: Mapping, tensors: Mapping[str, TensorInfo],
                aliases: Iterable[tuple[str, str]] = (("", ""),)) -> dict:
    """Flax params with the structure and shapes of ``template``, read from the checkpoint ``tensors``.

    ``template`` is a pytree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the module's
    ``init``). A leaf's tensor is the first of its :func:`torch_key` rewritten by each
    ``(old_prefix, new_prefix)`` alias that the checkpoint holds. Tensors the template does
    not use (a BERT pooler, a CLIP vision tower) are ignored. DiverifyError names a missing
    tensor, a shape mismatch (expected vs found, in PyTorch's layout) and a NaN/Inf weight.
    """
    aliases = tuple(aliases)

    def load(path, leaf):
        keys = [getattr(k, "key", str(k)) for k in path]
        key = torch_key(keys)
        names = _candidates(key, aliases)
        name = next((n for n in names if n in tensors), None)
        if name is None:
            raise DiverifyError(f"checkpoint tensor {names[0] if names else key!r} is missing "
                                f"(needed for parameter {'/'.join(keys)})")
        ref = tensors[name]
        transpose = keys[-1] == "kernel"
        expected = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)
        if ref.shape != expected:
            raise DiverifyError(f"checkpoint tensor {name!r} has shape {list(ref.shape)}, "
                                f"expected {list(expected)} from config.json")
        value = load_float_tensor(ref)
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise DiverifyError(f"checkpoint tensor {name!r} has {bad} NaN/Inf values")
        return jnp.asarray(value.T if transpose else value)

    return jax.tree_util.tree_map_with_path(load, template)
