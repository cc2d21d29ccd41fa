"""Checkpoints and PEFT LoRA adapters as lazily read ``name -> array`` maps.

A checkpoint is a directory of safetensors files (``model.safetensors``, or
shards listed by ``model.safetensors.index.json``, or any ``*.safetensors``)
with an optional ``config.json``, or a single ``.safetensors`` file. The
safetensors header is parsed here (8-byte little-endian length, JSON table of
``dtype``, ``shape``, ``data_offsets``) so that tensors are memory-mapped one
at a time, bfloat16 is supported without torch, and a truncated or garbled
file is reported by name instead of by a deep traceback.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys look like
``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``; its
delta on the base tensor ``...query.weight`` is ``scale * B @ A`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from diverify.audit.spectral import LowRankDelta
from diverify.errors import DiverifyError

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_ITEM_SIZE = {"BF16": 2, **{k: np.dtype(v).itemsize for k, v in _NUMPY_DTYPES.items()}}
#: Refuse headers beyond this size (the format's own reference limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000

#: config.json fields that must agree for two checkpoints to be the same architecture.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "vocab_size", "d_model", "n_layer", "n_embd")


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
        return self.dtype in _FLOAT_DTYPES


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensor table of one safetensors file, validated against the file's size."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DiverifyError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise DiverifyError(f"{path}: corrupt safetensors file (header length {header_len} "
                                    f"exceeds the file size {size})")
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except OSError as err:
        raise DiverifyError(f"{path}: cannot read ({err.strerror})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiverifyError(f"{path}: corrupt safetensors file (header is not JSON)") from err
    if not isinstance(header, dict):
        raise DiverifyError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise DiverifyError(f"{path}: corrupt safetensors entry for tensor {name}") from err
        if dtype not in _ITEM_SIZE:
            raise DiverifyError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = _ITEM_SIZE[dtype] * math.prod(shape)
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise DiverifyError(f"{path}: corrupt or truncated safetensors file (tensor {name} "
                                f"needs bytes {begin}..{end} of a {size - data_start}-byte data section)")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, expected)
    return tensors


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor as a numpy array; floating dtypes (bf16 and f16 included) become float32."""
    if info.nbytes == 0:
        dtype = np.float32 if info.is_float else _NUMPY_DTYPES[info.dtype]
        return np.zeros(info.shape, dtype=dtype)
    if info.dtype == "BF16":
        raw = np.memmap(info.file, dtype="<u2", mode="r", offset=info.offset, shape=info.shape)
        return (raw.astype(np.uint32) << 16).view(np.float32)
    dtype = np.dtype(_NUMPY_DTYPES[info.dtype]).newbyteorder("<")
    raw = np.memmap(info.file, dtype=dtype, mode="r", offset=info.offset, shape=info.shape)
    if info.is_float:
        return np.asarray(raw, dtype=np.float32)
    return np.asarray(raw)


def iter_tensor_bytes(info: TensorInfo, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The tensor's raw little-endian bytes in chunks of at most ``chunk`` bytes."""
    with open(info.file, "rb") as handle:
        handle.seek(info.offset)
        left = info.nbytes
        while left > 0:
            block = handle.read(min(chunk, left))
            if not block:
                raise DiverifyError(f"{info.file}: truncated while reading tensor {info.name}")
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


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiverifyError(f"{path}: cannot read {what} ({err})") from err


def _checkpoint_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map", {})
        return sorted({root / shard for shard in weight_map.values()})
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(root.glob("*.safetensors"))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory or ``.safetensors`` file without reading any tensor data."""
    root = Path(path)
    if root.is_file():
        files, config_path = [root], root.parent / "config.json"
    elif root.is_dir():
        files, config_path = _checkpoint_files(root), root / "config.json"
    else:
        raise DiverifyError(f"{path}: no such checkpoint file or directory")
    if not files:
        raise DiverifyError(f"{path}: no .safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise DiverifyError(f"{path}: shard {file.name} listed in the index is missing")
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise DiverifyError(f"{path}: tensor {name} appears in two shards")
            tensors[name] = info
    config = _read_json(config_path, "config.json") if config_path.is_file() else {}
    return Checkpoint(str(root), tensors, config)


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: per target tensor name, the delta ``(scale * B) @ A`` as factors."""

    path: str
    config: Mapping[str, Any]
    deltas: Mapping[str, LowRankDelta]


def is_lora_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def lora_scale(config: Mapping[str, Any], target: str, rank: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), honouring PEFT's per-module patterns."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if target.endswith(pattern) or pattern in target:
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def open_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; the factors are small, so they are loaded now."""
    root = Path(path)
    config = _read_json(root / "adapter_config.json", "adapter_config.json")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise DiverifyError(f"{root}: adapter type {peft_type} is not supported (only LORA)")
    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        raise DiverifyError(f"{root}: adapter_model.safetensors is missing")
    table = read_safetensors_header(weights)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, info in table.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                module = module.removeprefix("base_model.model.")
                factors.setdefault(module, {})[part] = load_tensor(info)
    if not factors:
        raise DiverifyError(f"{weights}: no lora_A / lora_B tensors found")
    deltas = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise DiverifyError(f"{weights}: {module} has no {missing} tensor")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DiverifyError(f"{weights}: {module} has mismatched LoRA factors A{a.shape} and B{b.shape}")
        scale = lora_scale(config, module, a.shape[0])
        deltas[f"{module}.weight"] = LowRankDelta(left=(scale * b).astype(np.float32), right=a)
    return LoraAdapter(str(root), config, deltas)


@dataclasses.dataclass(frozen=True)
class MatrixPair:
    """A base weight matrix and the suspect's change to it."""

    name: str
    base: np.ndarray
    delta: Union[np.ndarray, LowRankDelta]


def check_same_architecture(base: Checkpoint, suspect_config: Mapping[str, Any], suspect_path: str) -> None:
    """Raise if both configs name an architecture field and disagree on it."""
    for field in ARCHITECTURE_FIELDS:
        if field in base.config and field in suspect_config and base.config[field] != suspect_config[field]:
            raise DiverifyError(f"different architectures: base {base.path} has {field}="
                                f"{base.config[field]!r}, suspect {suspect_path} has {suspect_config[field]!r}")


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _resolve_adapter_target(module_weight: str, base_names: set[str]) -> str:
    """Map an adapter's target to a base tensor name, allowing a model prefix such as ``bert.``."""
    if module_weight in base_names:
        return module_weight
    matches = [n for n in base_names if n.endswith("." + module_weight) or module_weight.endswith("." + n)]
    if len(matches) != 1:
        raise DiverifyError(f"adapter targets {module_weight}, which the base checkpoint "
                            + ("does not have" if not matches else f"matches ambiguously ({_describe(matches)})"))
    return matches[0]


def iter_matrix_pairs(base: Checkpoint, suspect: Union[Checkpoint, LoraAdapter]) -> Iterator[MatrixPair]:
    """Pairs of 2-D floating base matrices and their deltas, one pair in memory at a time.

    Full checkpoints must hold the same tensor names and shapes (errors name
    the first offending tensors); an adapter contributes one low-rank delta per
    target module. Matrices whose delta is exactly zero are still yielded, so
    that per-kind statistics see every layer.
    """
    base_names = set(base.tensors)
    if isinstance(suspect, LoraAdapter):
        targets = {_resolve_adapter_target(name, base_names): delta for name, delta in suspect.deltas.items()}
        for name in sorted(targets):
            info = base.tensors[name]
            if tuple(info.shape) != tuple(targets[name].shape):
                raise DiverifyError(f"tensor {name}: adapter delta shape {targets[name].shape} "
                                    f"does not match base shape {info.shape}")
            yield MatrixPair(name, base.load(name), targets[name])
        return
    check_same_architecture(base, suspect.config, suspect.path)
    missing = sorted(base_names - set(suspect.tensors))
    extra = sorted(set(suspect.tensors) - base_names)
    if missing:
        raise DiverifyError(f"suspect {suspect.path} is missing tensors of the base: {_describe(missing)}")
    if extra:
        raise DiverifyError(f"suspect {suspect.path} has tensors the base lacks: {_describe(extra)}")
    for name in sorted(base_names):
        b_info, s_info = base.tensors[name], suspect.tensors[name]
        if b_info.shape != s_info.shape:
            raise DiverifyError(f"tensor {name}: shape {list(s_info.shape)} in the suspect, "
                                f"{list(b_info.shape)} in the base")
        if len(b_info.shape) != 2 or not b_info.is_float:
            continue
        w = base.load(name)
        yield MatrixPair(name, w, suspect.load(name) - w)
