"""Reading Hugging Face checkpoint directories: ``config.json`` and safetensors weights, with every check.

The safetensors format is read here directly (an 8-byte little-endian header
length, a JSON header, then the raw little-endian tensor data), so that a
truncated or corrupt file is reported with the file and tensor it concerns,
and ``BF16``/``F16`` tensors convert to float32 without a framework.

:func:`torch_key` is the whole Flax -> PyTorch name mapping of the text
encoders: module paths are the checkpoint's names with list indices written
``layer_3`` instead of ``layer.3``; leaves ``kernel`` (transposed),
``scale`` and ``embedding`` are the checkpoint's ``weight``.

Every problem with the user's files raises :class:`DiverifyError` with one
line naming the file or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from diverify.errors import DiverifyError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

#: Weight files of other formats, named in the error when no safetensors file is present.
OTHER_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                      "flax_model.msgpack", "model.ckpt", "model.ckpt.index")

_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16)}
_INT_DTYPES = {"I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
               "F8_E4M3", "F8_E5M2"}


def model_directory(directory: str | Path) -> Path:
    """``directory`` as a Path; DiverifyError if it does not exist or is not a directory."""
    path = Path(directory).expanduser()
    if not path.exists():
        raise DiverifyError(f"model directory {str(directory)!r} does not exist")
    if not path.is_dir():
        raise DiverifyError(f"model path {str(directory)!r} is not a directory")
    return path


def read_json(path: Path) -> Any:
    """Parse a JSON file; DiverifyError naming it when it is unreadable or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DiverifyError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise DiverifyError(f"{path} is not valid JSON ({err})") from None


def read_config(directory: str | Path) -> dict:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = model_directory(directory) / CONFIG_NAME
    if not path.is_file():
        raise DiverifyError(f"no {CONFIG_NAME} in model directory {str(directory)!r}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise DiverifyError(f"{path} does not hold a JSON object")
    return config


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Validate a safetensors file's header against its size; the tensors it holds, by name."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DiverifyError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise DiverifyError(f"{path} is truncated or not a safetensors file "
                                    f"(header of {header_len} bytes, file of {size} bytes)")
            raw = f.read(header_len)
    except OSError as err:
        raise DiverifyError(f"cannot read {path}: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise DiverifyError(f"{path} is corrupt: its safetensors header is unreadable ({err})") from None
    data_start, data_size = 8 + header_len, size - 8 - header_len
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DiverifyError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
        if end > data_size:
            raise DiverifyError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                f"but the file has {size} bytes")
        itemsize = _DTYPES[dtype].itemsize if dtype in _DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise DiverifyError(f"{path} is corrupt: tensor {name!r} of shape {list(shape)} {dtype} "
                                f"has {end - begin} bytes of data")
        refs[name] = TensorRef(path, dtype, shape, data_start + begin, end - begin)
    return refs


def open_checkpoint(directory: str | Path) -> dict[str, TensorRef]:
    """Every tensor of the safetensors weights of ``directory`` (single file or sharded via the index)."""
    root = model_directory(directory)
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    if single.is_file():
        return read_safetensors_header(single)
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise DiverifyError(f"{index} has no 'weight_map' object")
        refs: dict[str, TensorRef] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / str(shard)
            if not shard_path.is_file():
                raise DiverifyError(f"shard {shard!r} listed in {index} is missing")
            refs.update(read_safetensors_header(shard_path))
        return refs
    found = [name for name in OTHER_WEIGHT_FILES if (root / name).exists()]
    if found:
        raise DiverifyError(f"no {WEIGHTS_NAME} in {str(directory)!r}: found {found[0]}, but only safetensors "
                            "weights are supported (convert it with safetensors' save_file)")
    raise DiverifyError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in model directory {str(directory)!r}")


def read_tensor(name: str, ref: TensorRef) -> np.ndarray:
    """Tensor ``name`` as float32; DiverifyError for a non-float dtype or a short read."""
    if ref.dtype not in _DTYPES:
        kind = "integer/boolean" if ref.dtype in _INT_DTYPES else "unknown"
        raise DiverifyError(f"tensor {name!r} in {ref.file} has {kind} dtype {ref.dtype}, expected floating point")
    dtype = _DTYPES[ref.dtype]
    count = ref.nbytes // dtype.itemsize
    try:
        data = np.fromfile(ref.file, dtype=dtype, count=count, offset=ref.offset)
    except OSError as err:
        raise DiverifyError(f"cannot read tensor {name!r} from {ref.file}: {err}") from None
    if data.size != count:
        raise DiverifyError(f"{ref.file} is truncated: tensor {name!r} is incomplete")
    return data.reshape(ref.shape).astype(np.float32)


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


def load_params(template: Mapping, tensors: Mapping[str, TensorRef],
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
        value = read_tensor(name, ref)
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise DiverifyError(f"checkpoint tensor {name!r} has {bad} NaN/Inf values")
        return jnp.asarray(value.T if transpose else value)

    return jax.tree_util.tree_map_with_path(load, template)
