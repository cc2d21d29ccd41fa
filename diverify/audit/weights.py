"""Base/suspect weight pairs for the audit, from checkpoints or PEFT LoRA adapters.

Checkpoints (a directory of safetensors files with an optional
``config.json``, or a single ``.safetensors`` file) are read lazily by
:mod:`diverify.safetensors_io`, one tensor in memory at a time.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys look like
``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``; its
delta on the base tensor ``...query.weight`` is ``scale * B @ A`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from diverify.audit.spectral import LowRankDelta
from diverify.errors import DiverifyError
from diverify.safetensors_io import Checkpoint, load_float_tensor, read_json, read_safetensors_header

#: config.json fields that must agree for two checkpoints to be the same architecture.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "vocab_size", "d_model", "n_layer", "n_embd")


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
    config = read_json(root / "adapter_config.json")
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
                factors.setdefault(module, {})[part] = load_float_tensor(info)
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
