"""The one safetensors reader: checkpoint directories as lazily read ``name -> tensor`` tables.

A safetensors file is an 8-byte little-endian header length, a JSON header
(per tensor ``dtype``, ``shape``, ``data_offsets`` into the data section),
then the raw little-endian tensor bytes. It is parsed here rather than through
a framework so that every tensor is memory-mapped only when asked for,
bfloat16/float16 convert to float32 without torch, and a truncated or garbled
file is reported with the file and tensor it concerns.

A checkpoint is a directory with ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or else any ``*.safetensors`` files, and an
optional ``config.json``; or a single ``.safetensors`` file. Every problem
with the user's files raises :class:`DiverifyError` in one line naming the
file or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from diverify.errors import DiverifyError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

#: Weight files of other formats, named in the error when no safetensors file is present.
OTHER_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                      "flax_model.msgpack", "model.ckpt", "model.ckpt.index")

_FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                 "BF16": np.dtype(ml_dtypes.bfloat16)}
_OTHER_DTYPES = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
                 "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
                 "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                 "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
#: Refuse headers beyond this size (the format's own reference limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's raw little-endian bytes lie: ``file`` at ``offset``, ``nbytes`` long."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def is_float(self) -> bool:
        """A float16/bfloat16/float32/float64 tensor (float8 counts as quantised storage, not as weights)."""
        return self.dtype in _FLOAT_DTYPES


def read_json(path: Path) -> Any:
    """Parse a JSON file; DiverifyError naming it when it is unreadable or invalid."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DiverifyError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise DiverifyError(f"{path} is not valid JSON ({err})") from None


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensor table of one safetensors file, validated against the file's size.

    A dtype this module cannot decode is kept (its bytes can still be hashed);
    :func:`load_tensor` refuses it.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DiverifyError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise DiverifyError(f"{path} is corrupt or truncated: its header length, {header_len} bytes, "
                                    f"exceeds the file's {size} bytes")
            raw = handle.read(header_len)
    except OSError as err:
        raise DiverifyError(f"cannot read {path}: {err.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise DiverifyError(f"{path} is corrupt: its safetensors header is unreadable ({err})") from None
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DiverifyError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
        if begin < 0 or end < begin:
            raise DiverifyError(f"{path} is corrupt: tensor {name!r} has data offsets {begin}..{end}")
        if end > data_size:
            raise DiverifyError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                f"but the file has {size} bytes")
        known = _FLOAT_DTYPES.get(dtype, _OTHER_DTYPES.get(dtype))
        if known is not None and end - begin != math.prod(shape) * known.itemsize:
            raise DiverifyError(f"{path} is corrupt: tensor {name!r} of shape {list(shape)} {dtype} "
                                f"has {end - begin} bytes of data")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor as a numpy array: floating dtypes become float32, others keep their dtype.

    Memory-mapped, so only the pages of this tensor are read.
    """
    dtype = _FLOAT_DTYPES.get(info.dtype, _OTHER_DTYPES.get(info.dtype))
    if dtype is None:
        raise DiverifyError(f"tensor {info.name!r} in {info.file} has unsupported dtype {info.dtype}")
    if info.nbytes == 0:
        return np.zeros(info.shape, np.float32 if info.is_float else dtype)
    raw = np.memmap(info.file, dtype=dtype, mode="r", offset=info.offset, shape=info.shape)
    return raw.astype(np.float32) if info.is_float else np.asarray(raw)


def load_float_tensor(info: TensorInfo) -> np.ndarray:
    """:func:`load_tensor` for a weight, which must be floating point."""
    if not info.is_float:
        kind = "integer/boolean" if info.dtype in _OTHER_DTYPES else "unknown"
        raise DiverifyError(f"tensor {info.name!r} in {info.file} has {kind} dtype {info.dtype}, "
                            "expected floating point")
    return load_tensor(info)


def iter_tensor_bytes(info: TensorInfo, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The tensor's raw little-endian bytes in chunks of at most ``chunk`` bytes."""
    with open(info.file, "rb") as handle:
        handle.seek(info.offset)
        left = info.nbytes
        while left > 0:
            block = handle.read(min(chunk, left))
            if not block:
                raise DiverifyError(f"{info.file} is truncated: tensor {info.name!r} is incomplete")
            left -= len(block)
            yield block


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model's tensors (read lazily) and its ``config.json`` (empty when absent)."""

    path: str
    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, Any]

    def load(self, name: str) -> np.ndarray:
        return load_tensor(self.tensors[name])


def _weight_files(root: Path) -> list[Path]:
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise DiverifyError(f"{index} has no 'weight_map' object")
        shards = [root / str(shard) for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise DiverifyError(f"shard {shard.name!r} listed in {index} is missing")
        return shards
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    found = [name for name in OTHER_WEIGHT_FILES if (root / name).exists()]
    if found:
        raise DiverifyError(f"no {WEIGHTS_NAME} in {str(root)!r}: found {found[0]}, but only safetensors "
                            "weights are supported (convert it with safetensors' save_file)")
    raise DiverifyError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}, or any .safetensors file) in {str(root)!r}")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory or ``.safetensors`` file without reading any tensor data."""
    root = Path(path).expanduser()
    if root.is_file():
        files, config_path = [root], root.parent / CONFIG_NAME
    elif root.is_dir():
        files, config_path = _weight_files(root), root / CONFIG_NAME
    else:
        raise DiverifyError(f"{path}: no such checkpoint file or directory")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise DiverifyError(f"{path}: tensor {name!r} appears in two shards")
            tensors[name] = info
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise DiverifyError(f"{config_path} does not hold a JSON object")
    return Checkpoint(str(root), tensors, config)
